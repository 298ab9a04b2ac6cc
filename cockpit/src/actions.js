/* Alerts and D-Bus actions: a refusal becomes one readable alert carrying the error's name;
   nothing is retried or undone here (the daemon changed nothing). */
import { createContext, useContext } from "react";

import { describe } from "./errors.js";

export const PageContext = createContext(null);
export const usePage = () => useContext(PageContext);

let nextAlert = 1;
export const alertId = () => nextAlert++;

export function alertsReducer(alerts, action) {
    if (action.type === "add") return [action.alert, ...alerts].slice(0, 5);
    if (action.type === "remove") return alerts.filter((a) => a.id !== action.id);
    return alerts;
}

/* act(what, promise, success) -> the reply, or null after an alert naming the refusal. */
export function makeAct(addAlert) {
    return (what, promise, success) => promise.then((reply) => {
        if (success) addAlert({ variant: "success", title: success });
        return reply;
    }, (err) => {
        const e = describe(err);
        addAlert({ variant: "danger", title: `${what}: ${e.title}`, detail: e.detail, name: e.name });
        return null;
    });
}

export const ADMIN_OFF = "Administrative access is off: turn it on in Cockpit's top bar to change AP matrices.";
