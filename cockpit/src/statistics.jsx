/* What only the daemon knows (Manager.Statistics): its last rescan and the drifts it found,
   one small label in the host line; the detail in a popover, read again when it opens (the
   property sends no PropertiesChanged). */
import React from "react";
import { Label } from "@patternfly/react-core/dist/esm/components/Label/index.js";
import { Popover } from "@patternfly/react-core/dist/esm/components/Popover/index.js";

const KINDS = {
    sets: "a live matrix's sets changed outside",
    created: "an mdev created outside",
    removed: "an mdev removed outside",
    started: "a defined matrix found live",
    host_pool: "the host pool changed outside",
    while_stopped: "changed while apmatrixd was not running",
    released: "a forced Stop/Remove finished late",
};

const total = (counts) => Object.values(counts || {}).reduce((a, b) => a + Number(b), 0);

function when(usec) {
    if (!usec) return "not yet";
    return new Date(Number(usec) / 1000).toLocaleTimeString();
}

export function Statistics({ statistics, refresh }) {
    if (!statistics) return null;
    const drifts = statistics.drifts || {};
    const notAdopted = statistics.drifts_not_adopted || {};
    const refused = Object.entries(statistics.refused || {});
    const n = total(drifts);
    const kinds = Object.entries(drifts).filter(([, c]) => Number(c) > 0);
    const body = (
        <div id="statistics-detail">
            <p>Last rescan (every mdev and the host pool read again): <span id="statistics-rescan">{when(statistics.last_rescan)}</span></p>
            {kinds.length === 0
                ? <p>No drift since apmatrixd started: nothing was changed behind its back.</p>
                : <ul className="statistics-list" aria-label="Drifts by kind">
                    {kinds.map(([k, c]) => (
                        <li key={k} data-kind={k}>{c} × {KINDS[k] || k}
                            {Number(notAdopted[k] || 0) > 0 && <>, {notAdopted[k]} not adopted (they break a rule)</>}</li>))}
                </ul>}
            {refused.length > 0 && <p>Calls refused: {refused.map(([k, c]) => `${k.split(".").at(-1)} ${c}`).join(", ")}</p>}
        </div>
    );
    return (
        <Popover headerContent="Since apmatrixd started" bodyContent={body} onShow={refresh} aria-label="apmatrixd's statistics">
            <Label isCompact id="statistics" variant="outline" color={total(notAdopted) ? "orange" : "grey"}
                   data-drifts={n} onClick={() => undefined}>
                {n === 0 ? "no drift" : `${n} drift${n === 1 ? "" : "s"}`}, rescanned {when(statistics.last_rescan)}
            </Label>
        </Popover>
    );
}
