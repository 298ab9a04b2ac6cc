/* Small parts the cards share: buttons and switches that change something, and copying. */
import React, { useState } from "react";
import { Button } from "@patternfly/react-core/dist/esm/components/Button/index.js";
import { Switch } from "@patternfly/react-core/dist/esm/components/Switch/index.js";
import { Tooltip } from "@patternfly/react-core/dist/esm/components/Tooltip/index.js";
import CopyIcon from "@patternfly/react-icons/dist/esm/icons/copy-icon.js";

import { usePage } from "./actions.js";

/* A button that changes something: without administrative access, or with a reason it cannot
   be done (another tool manages the matrix), it is shown disabled, says why (tooltip, and
   aria-describedby for a screen reader) and is never pressed. */
export function ChangeButton({ children, reason, ...props }) {
    const { admin, adminReason } = usePage();
    const why = !admin ? adminReason : reason;
    const button = (
        <Button {...props} isAriaDisabled={!!why || props.isAriaDisabled}
                aria-describedby={!admin ? "admin-reason" : undefined}
                data-disabled-reason={why || undefined}>
            {children}
        </Button>
    );
    return why ? <Tooltip content={why}>{button}</Tooltip> : button;
}

/* The same for a switch (PatternFly's Switch has no aria-disabled form: it is disabled, and
   the tooltip sits on a wrapper that still gets the pointer). */
export function ChangeSwitch({ reason, ...props }) {
    const { admin, adminReason } = usePage();
    const why = !admin ? adminReason : reason;
    const sw = <Switch {...props} isDisabled={!!why} aria-describedby={admin ? undefined : "admin-reason"}
                       data-disabled-reason={why || undefined} />;
    return why ? <Tooltip content={why}><span>{sw}</span></Tooltip> : sw;
}

/* -- copy to the clipboard (the Clipboard API needs a secure context; else the old way) ----- */
function legacyCopy(text) {
    const ta = document.createElement("textarea");
    ta.className = "offscreen";
    ta.readOnly = true;
    ta.value = text;
    document.body.append(ta);
    ta.select();
    let ok = false;
    try {
        ok = document.execCommand("copy");
    } catch (e) {
        ok = false;
    }
    ta.remove();
    return ok;
}

/* Copies `text`, or what `get()` resolves to (asked only when pressed: a row of a thousand
   must not ask the daemon a thousand times). `children` makes it a labelled link button. */
export function CopyButton({ text, get, what, className, children }) {
    const [copied, setCopied] = useState("");
    const copy = () => {
        const done = (ok) => {
            setCopied(ok ? "true" : "false");
            window.setTimeout(() => setCopied(""), 3000);
        };
        Promise.resolve(get ? get() : text).then((t) => {
            const api = navigator.clipboard && window.isSecureContext
                ? navigator.clipboard.writeText(t)
                : Promise.reject(new Error("no clipboard API"));
            return api.then(() => done(true), () => done(legacyCopy(t)));
        }, () => done(false));
    };
    const tip = copied === "true" ? "Copied" : copied === "false" ? "Copy failed" : `Copy ${what}`;
    return (
        <Tooltip content={tip}>
            <Button variant={children ? "link" : "plain"} size="sm" className={"copy " + (className || "")} icon={<CopyIcon />}
                    isInline={!!children} aria-label={`Copy ${what}`} data-copied={copied} onClick={copy}>
                {children}
            </Button>
        </Tooltip>
    );
}
