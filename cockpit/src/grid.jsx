/*
 * The adapters x domains grid, coloured by owner: host pool, each matrix (its letter and
 * colour), free (reserved, in no matrix), absent; what a Check being typed would add and where
 * it clashes. A big host has 256 x 256 APQNs: the grid shows a window of them (paged along both
 * axes, at most 64 x 64 cells), optionally only the adapters and domains matrices hold, and jumps
 * to what a Check proposes. Arrow keys move between cells (one tab stop for the whole grid).
 */
import React, { useEffect, useMemo, useRef, useState } from "react";
import { Card, CardBody, CardHeader, CardTitle } from "@patternfly/react-core/dist/esm/components/Card/index.js";
import { Pagination } from "@patternfly/react-core/dist/esm/components/Pagination/index.js";
import { ToggleGroup, ToggleGroupItem } from "@patternfly/react-core/dist/esm/components/ToggleGroup/index.js";
import { Toolbar, ToolbarContent, ToolbarItem } from "@patternfly/react-core/dist/esm/components/Toolbar/index.js";

import { usePage } from "./actions.js";
import { apqnName, hex2, key, unkey } from "./ids.js";
import { MANAGERS, label, managerOf } from "./model.js";

const PER_PAGE = [16, 32, 64].map((n) => ({ title: String(n), value: n }));

export function ownerLabel(owner, byUuid) {
    if (owner === "host") return "the host pool";
    const m = byUuid.get(owner);
    return m && m.Name ? `${m.Name} (${owner})` : owner;
}

function Swatch({ cls, tag, colour }) {
    return <span className={"swatch " + cls} style={colour ? { "--owner": colour } : undefined} aria-hidden="true">{tag}</span>;
}

/* One APQN, drawn again only when what it shows changes: a change to one matrix redraws its
   own cells, not the window's thousand. */
const Cell = React.memo(function Cell({ cls, title, name, owner, clash, r, c, focused, colour, text }) {
    return (
        <td role="gridcell" className={"cell " + cls} title={title} aria-label={title}
            data-apqn={name} data-owner={owner} data-clash={clash ? "true" : undefined} data-r={r} data-c={c}
            tabIndex={focused ? 0 : -1} style={colour ? { "--owner": colour } : undefined}>{text}</td>
    );
});

/* Everything about the host that does not depend on the window shown. */
function useHost(d) {
    const hostAxes = useMemo(() => {
        const adapters = new Set();
        const domains = new Set();
        for (const a of d.adapters) {
            adapters.add(a.Id);
            for (const dom of a.Domains || []) domains.add(dom);
        }
        return { adapters, domains, byId: new Map(d.adapters.map((a) => [a.Id, a])) };
    }, [d.adapters]);
    const held = useMemo(() => {
        const ownerOf = new Map();
        const guestSees = new Set();
        const lost = new Map();
        const adapters = new Set();
        const domains = new Set();
        for (const m of d.matrices) {
            for (const [a, dom] of m.Apqns || []) ownerOf.set(key(a, dom), m);
            for (const [a, dom] of m.GuestApqns || []) guestSees.add(key(a, dom));
            for (const [a, dom, why] of m.Lost || []) lost.set(key(a, dom), why);
            for (const a of m.Adapters || []) adapters.add(a);
            for (const dom of m.Domains || []) domains.add(dom);
        }
        return { ownerOf, guestSees, lost, adapters, domains };
    }, [d.matrices]);
    return { hostAxes, held };
}

function axis(view, hostIds, heldIds, mineIds, proposed) {
    const ids = new Set(view === "all" ? [...hostIds, ...heldIds] : view === "held" ? heldIds : mineIds);
    for (const id of proposed) ids.add(id);
    return [...ids].sort((x, y) => x - y);
}

export function GridCard({ d }) {
    const { preview, selected } = usePage();
    const { hostAxes, held } = useHost(d);
    const [view, setView] = useState("all");
    const [perPage, setPerPage] = useState(32);
    const [aPage, setAPage] = useState(1);
    const [dPage, setDPage] = useState(1);
    const [focus, setFocus] = useState([0, 0]);
    const table = useRef(null);

    const mine = selected ? d.byUuid.get(selected) : null;
    const effectiveView = view === "matrix" && !mine ? "all" : view;
    const proposedA = new Set();
    const proposedD = new Set();
    if (preview) for (const k of preview.proposed) {
        const [a, dom] = unkey(k);
        proposedA.add(a);
        proposedD.add(dom);
    }
    const rows = axis(effectiveView, hostAxes.adapters, held.adapters, mine ? mine.Adapters : [], proposedA);
    const cols = axis(effectiveView, hostAxes.domains, held.domains, mine ? mine.Domains : [], proposedD);
    const aPages = Math.max(1, Math.ceil(rows.length / perPage));
    const dPages = Math.max(1, Math.ceil(cols.length / perPage));
    const ap = Math.min(aPage, aPages);
    const dp = Math.min(dPage, dPages);

    /* A Check being typed: show its first proposed APQN if it is off the window. */
    useEffect(() => {
        if (!preview || !preview.proposed.size) return;
        const [a, dom] = unkey(Math.min(...preview.proposed));
        const ai = rows.indexOf(a);
        const di = cols.indexOf(dom);
        if (ai >= 0 && Math.floor(ai / perPage) + 1 !== ap) setAPage(Math.floor(ai / perPage) + 1);
        if (di >= 0 && Math.floor(di / perPage) + 1 !== dp) setDPage(Math.floor(di / perPage) + 1);
    }, [preview]); // eslint-disable-line react-hooks/exhaustive-deps

    const shownA = rows.slice((ap - 1) * perPage, ap * perPage);
    const shownD = cols.slice((dp - 1) * perPage, dp * perPage);
    const inWindow = new Set();
    const managers = new Set();
    let anyMissing = false;
    let anyAhead = false;

    const body = shownA.map((a, r) => {
        const ad = hostAxes.byId.get(a);
        const present = new Set(ad ? ad.Domains : []);
        const guest = new Set(ad ? ad.GuestDomains : []);
        const down = !ad || !ad.Online || !ad.Configured;
        const cells = shownD.map((dom, c) => {
            const k = key(a, dom);
            const m = held.ownerOf.get(k);
            const here = present.has(dom);
            let cls, owner, title, text = "";
            let colour;
            if (m) {
                /* A live matrix's APQN its guest does not get. Absent on the host (assigned ahead,
                   over-provisioned): drawn apart from one the guest had and lost (adapter offline,
                   deconfigured, queue taken); the reason is the daemon's. */
                const notGiven = m.State !== "defined" && !held.guestSees.has(k);
                const tag = d.tags.get(m.Uuid);
                inWindow.add(m.Uuid);
                owner = m.Uuid;
                colour = tag.colour;
                const who = managerOf(m);
                cls = "owned" + (notGiven ? (here ? " missing" : " ahead") : "") + (who === "apmatrixd" ? "" : " by-" + who);
                managers.add(who);
                if (notGiven && here) anyMissing = true;
                if (notGiven && !here) anyAhead = true;
                text = tag.tag;
                title = `${label(m)} (${m.Uuid})` + (who === "apmatrixd" ? "" : `, managed by ${MANAGERS[who] ? MANAGERS[who].name : who}`);
                if (notGiven) {
                    const why = held.lost.get(k);
                    title += ": " + (why || (here ? "not seen by the guest" : "queue absent on the host"));
                }
            } else if (!here) {
                cls = "absent";
                owner = "absent";
                title = "no such queue on this host";
            } else if (!guest.has(dom)) {
                cls = "host";
                owner = "host";
                title = "host pool (the host's own crypto drivers)";
            } else {
                cls = "free";
                owner = "free";
                title = "free: reserved for guests, in no matrix";
            }
            if (down && here && !m) cls += " down";
            const proposed = preview && preview.proposed.has(k);
            if (proposed) cls += " proposed";
            const clash = preview && preview.clashes.get(k);
            if (clash) {
                cls += " clash";
                title += clash === "host" ? "; CLASH: still in the host pool" : `; CLASH: held by ${ownerLabel(clash, d.byUuid)}`;
            } else if (proposed) {
                title += "; proposed";
            }
            const name = apqnName(a, dom);
            return <Cell key={dom} cls={cls} title={`${name}: ${title}`} name={name} owner={owner} clash={!!clash}
                         r={r} c={c} focused={focus[0] === r && focus[1] === c} colour={colour} text={text} />;
        });
        const why = !ad ? "absent" : down ? (ad.Configured ? "offline" : "deconfigured") : "";
        return (
            <tr key={a}>
                <th scope="row" className={"adapter" + (down ? " down" : "")} title={why}>
                    <span className="adapter-id">{hex2(a)}</span>
                    <span className="adapter-type">{ad ? ad.Type : "absent"}</span>
                    {why && <span className="pf-v6-screen-reader"> ({why})</span>}
                </th>
                {cells}
            </tr>
        );
    });

    /* Arrow keys, Home/End and PageUp/PageDown move the one focusable cell. */
    const onKeyDown = (ev) => {
        const [r, c] = focus;
        const moves = {
            ArrowUp: [r - 1, c], ArrowDown: [r + 1, c], ArrowLeft: [r, c - 1], ArrowRight: [r, c + 1],
            Home: [r, 0], End: [r, shownD.length - 1], PageUp: [0, c], PageDown: [shownA.length - 1, c],
        };
        const to = moves[ev.key];
        if (!to) return;
        ev.preventDefault();
        const nr = Math.max(0, Math.min(shownA.length - 1, to[0]));
        const nc = Math.max(0, Math.min(shownD.length - 1, to[1]));
        setFocus([nr, nc]);
        const cell = table.current.querySelector(`td[data-r="${nr}"][data-c="${nc}"]`);
        if (cell) cell.focus();
    };

    const pager = (what, count, page, setPage) => (
        <Pagination id={`grid-${what}-pages`} widgetId={`grid-${what}-pages-widget`} isCompact itemCount={count}
                    perPage={perPage} page={page} perPageOptions={PER_PAGE}
                    titles={{ items: what + "s", paginationAriaLabel: `${what} pages` }}
                    onSetPage={(ev, n) => setPage(n)} onPerPageSelect={(ev, n) => { setPerPage(n); setAPage(1); setDPage(1) }} />
    );
    const legendMatrices = d.matrices.filter((m) => inWindow.has(m.Uuid));
    const paged = rows.length > perPage || cols.length > perPage;
    return (
        <Card id="grid-card">
            <CardHeader>
                <CardTitle component="h2" id="grid-title">APQNs: adapters × domains</CardTitle>
            </CardHeader>
            <CardBody>
                <Toolbar className="grid-toolbar" inset={{ default: "insetNone" }}>
                    <ToolbarContent>
                        <ToolbarItem>
                            <ToggleGroup id="grid-view" aria-label="Which adapters and domains" isCompact>
                                <ToggleGroupItem text="All" buttonId="grid-view-all" isSelected={effectiveView === "all"} onChange={() => setView("all")} />
                                <ToggleGroupItem text="Held by matrices" buttonId="grid-view-held" isSelected={effectiveView === "held"} onChange={() => setView("held")} />
                                <ToggleGroupItem text={mine ? `Only ${label(mine)}` : "Only the selected matrix"} buttonId="grid-view-matrix"
                                                 isDisabled={!mine} isSelected={effectiveView === "matrix"} onChange={() => setView("matrix")} />
                            </ToggleGroup>
                        </ToolbarItem>
                        <ToolbarItem id="grid-extent">
                            {rows.length} adapters × {cols.length} domains
                            {paged && `; showing ${shownA.length} × ${shownD.length}`}
                        </ToolbarItem>
                        {paged && <>
                            <ToolbarItem>{pager("adapter", rows.length, ap, setAPage)}</ToolbarItem>
                            <ToolbarItem>{pager("domain", cols.length, dp, setDPage)}</ToolbarItem>
                        </>}
                    </ToolbarContent>
                </Toolbar>
                <ul id="legend" className="legend" aria-label="Legend">
                    <li><Swatch cls="host" />host pool</li>
                    <li><Swatch cls="free" />free (reserved)</li>
                    <li><Swatch cls="absent" />absent</li>
                    {legendMatrices.slice(0, 24).map((m) => {
                        const t = d.tags.get(m.Uuid);
                        const who = managerOf(m);
                        return <li key={m.Uuid} data-manager={who}><Swatch cls={"owned by-" + who} tag={t.tag} colour={t.colour} />{label(m)}
                            {who !== "apmatrixd" && <span className="muted"> ({MANAGERS[who] ? MANAGERS[who].short : who})</span>}</li>;
                    })}
                    {legendMatrices.length > 24 && <li>… {legendMatrices.length - 24} more matrices</li>}
                    {managers.has("mdevctl") && <li id="legend-mdevctl"><Swatch cls="owned by-mdevctl" />managed by mdevctl (round)</li>}
                    {managers.has("external") && <li id="legend-external"><Swatch cls="owned by-external" />made outside apmatrixd (corner cut)</li>}
                    {anyMissing && <li><Swatch cls="owned missing" />lost by its guest</li>}
                    {anyAhead && <li><Swatch cls="owned ahead" />assigned, not on this host</li>}
                    {preview && preview.clashes.size > 0 && <li><Swatch cls="clash" />clash</li>}
                    {preview && <li><Swatch cls="proposed" />proposed</li>}
                </ul>
                {rows.length === 0
                    ? <p id="grid-empty" className="muted">No AP adapters on this host.</p>
                    : (
                        <div className="grid-wrap">
                            <table id="grid" className="grid" role="grid" aria-labelledby="grid-title"
                                   aria-rowcount={rows.length + 1} aria-colcount={cols.length + 1}
                                   ref={table} onKeyDown={onKeyDown}
                                   onFocus={(ev) => {
                                       const { r, c } = ev.target.dataset;
                                       if (r !== undefined) setFocus([Number(r), Number(c)]);
                                   }}>
                                <thead>
                                    <tr>
                                        <th className="corner" scope="col">adapter \ domain</th>
                                        {shownD.map((dom) => <th key={dom} scope="col" className="dom">{hex2(dom)}</th>)}
                                    </tr>
                                </thead>
                                <tbody>{body}</tbody>
                            </table>
                        </div>)}
            </CardBody>
        </Card>
    );
}
