/* The Cockpit page's entry: theme first (no light flash in dark mode), then PatternFly and ours. */
import "./theme.js";
import "@patternfly/patternfly/patternfly-base.css";
import "./fonts.css";
import "./app.css";

import React from "react";
import { createRoot } from "react-dom/client";

import { Application } from "./app.jsx";
import { Apmatrix } from "./model.js";

document.addEventListener("DOMContentLoaded", () => {
    const model = new Apmatrix();
    createRoot(document.getElementById("app")).render(<Application model={model} />);
    model.start();
});
