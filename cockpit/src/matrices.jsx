/*
 * The matrices: a filtered, paged table (a host may have a thousand) with who manages each,
 * start, stop, remove, take over and the copy buttons for QEMU and libvirt, and "Apply a
 * layout" (apply.jsx); a matrix's detail opens in the drawer (detail.jsx).
 */
import React, { useCallback, useRef, useState } from "react";
import { Button } from "@patternfly/react-core/dist/esm/components/Button/index.js";
import { Card, CardBody, CardHeader, CardTitle } from "@patternfly/react-core/dist/esm/components/Card/index.js";
import { Pagination } from "@patternfly/react-core/dist/esm/components/Pagination/index.js";
import { SearchInput } from "@patternfly/react-core/dist/esm/components/SearchInput/index.js";
import { Toolbar, ToolbarContent, ToolbarGroup, ToolbarItem } from "@patternfly/react-core/dist/esm/components/Toolbar/index.js";
import { Table, Tbody, Td, Th, Thead, Tr } from "@patternfly/react-table/dist/esm/components/Table/index.js";

import { usePage } from "./actions.js";
import { ApplyButton } from "./apply.jsx";
import { apqnName, formatIds } from "./ids.js";
import { managerOf } from "./model.js";
import { CopyButtons, LostList, ManagerLabel, MatrixActions, StateLabels, guestText, useLifecycle } from "./lifecycle.jsx";

const MatrixRow = React.memo(function MatrixRow({ m, tag, isSelected, ask, select }) {
    return (
        <Tr data-uuid={m.Uuid} data-manager={managerOf(m)} isRowSelected={isSelected}>
            <Td dataLabel="Name" className="name">
                <span className={"swatch owned by-" + managerOf(m)} style={{ "--owner": tag.colour }} aria-hidden="true">{tag.tag}</span>
                {m.Name || <span className="muted">(unnamed)</span>}
            </Td>
            <Td dataLabel="UUID"><code>{m.Uuid}</code></Td>
            <Td dataLabel="Managed by" className="manager"><ManagerLabel m={m} /></Td>
            <Td dataLabel="State" className="state" data-state={m.State}><StateLabels m={m} /></Td>
            <Td dataLabel="Adapters" className="ids adapters">{formatIds(m.Adapters || [])}</Td>
            <Td dataLabel="Domains" className="ids domains">{formatIds(m.Domains || [])}</Td>
            <Td dataLabel="Control" className="ids control">{formatIds(m.ControlDomains || [])}</Td>
            <Td dataLabel="Guest sees" className="guest" title={(m.GuestApqns || []).map(([a, d]) => apqnName(a, d)).join(" ")}>
                {guestText(m)}
                <LostList m={m} limit={3} />
            </Td>
            <Td dataLabel="Copy for QEMU, libvirt" className="copy-cell"><CopyButtons m={m} /></Td>
            <Td dataLabel="Actions" className="actions">
                <div className="btns">
                    <MatrixActions m={m} ask={ask} />
                    <Button size="sm" variant="link" className="details" aria-expanded={isSelected}
                            onClick={() => select(isSelected ? null : m.Uuid)}>Details</Button>
                </div>
            </Td>
        </Tr>
    );
});

function matches(m, text) {
    if (!text) return true;
    const t = text.toLowerCase();
    return [m.Name, m.Uuid, m.State, managerOf(m), formatIds(m.Adapters || []), formatIds(m.Domains || [])]
        .some((s) => s && s.toLowerCase().includes(t));
}

export function MatricesCard({ d }) {
    const { select, selected } = usePage();
    const [filter, setFilter] = useState("");
    const [page, setPage] = useState(1);
    const [perPage, setPerPage] = useState(20);
    const { ask, dialog } = useLifecycle();
    /* One function for every row's buttons, so that a row is drawn again only when its
       matrix changes (a host may have a thousand). */
    const latest = useRef(null);
    latest.current = ask;
    const askLatest = useCallback((verb, m) => latest.current(verb, m), []);

    const shown = filter ? d.matrices.filter((m) => matches(m, filter)) : d.matrices;
    const pages = Math.max(1, Math.ceil(shown.length / perPage));
    const p = Math.min(page, pages);
    const rows = shown.slice((p - 1) * perPage, p * perPage);
    const pager = (variant) => (
        <Pagination id={`matrices-pages-${variant}`} widgetId={`matrices-pages-${variant}-widget`} itemCount={shown.length}
                    perPage={perPage} page={p} variant={variant} isCompact={variant === "top"}
                    titles={{ items: "matrices", paginationAriaLabel: "Matrix pages" }}
                    onSetPage={(ev, n) => setPage(n)} onPerPageSelect={(ev, n) => { setPerPage(n); setPage(1) }} />
    );
    return (
        <Card id="matrices-card">
            <CardHeader><CardTitle component="h2" id="matrices-title">Matrices</CardTitle></CardHeader>
            <CardBody>
                <Toolbar inset={{ default: "insetNone" }}>
                    <ToolbarContent>
                        <ToolbarItem>
                            <SearchInput id="matrix-filter" aria-label="Filter matrices" placeholder="Filter by name, UUID, state, manager or id"
                                         value={filter} onChange={(ev, x) => { setFilter(x); setPage(1) }} onClear={() => setFilter("")} />
                        </ToolbarItem>
                        <ToolbarGroup id="matrices-tools"><ToolbarItem><ApplyButton /></ToolbarItem></ToolbarGroup>
                        <ToolbarItem variant="pagination" align={{ default: "alignEnd" }}>{pager("top")}</ToolbarItem>
                    </ToolbarContent>
                </Toolbar>
                <Table id="matrices" aria-labelledby="matrices-title" variant="compact">
                    <Thead>
                        <Tr>
                            {["Name", "UUID", "Managed by", "State", "Adapters", "Domains", "Control", "Guest sees", "Copy"]
                                .map((h) => <Th key={h} modifier="wrap">{h}</Th>)}
                            <Th screenReaderText="Actions" />
                        </Tr>
                    </Thead>
                    <Tbody>
                        {rows.map((m) => <MatrixRow key={m.Uuid} m={m} tag={d.tags.get(m.Uuid)} isSelected={selected === m.Uuid}
                                                    ask={askLatest} select={select} />)}
                    </Tbody>
                </Table>
                {d.matrices.length === 0 && <p id="matrices-empty" className="muted">No matrices yet.</p>}
                {d.matrices.length > 0 && shown.length === 0 && <p className="muted">No matrix matches the filter.</p>}
                {shown.length > perPage && pager("bottom")}
                {dialog}
            </CardBody>
        </Card>
    );
}

