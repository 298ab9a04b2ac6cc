/* Small parts the cards share. */
import React from "react";
import { Button } from "@patternfly/react-core/dist/esm/components/Button/index.js";
import { Tooltip } from "@patternfly/react-core/dist/esm/components/Tooltip/index.js";

import { usePage } from "./actions.js";

/* A button that changes something: without administrative access it is shown disabled, says
   why (tooltip, and aria-describedby for a screen reader) and is never pressed. */
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
