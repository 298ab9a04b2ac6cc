/* The host's adapters (cards): type, mode, state, queues and who holds them, and the queues
   bound by driver_override to another driver; one adapter's queues open below its row. */
import React, { useCallback, useState } from "react";
import { Card, CardBody, CardHeader, CardTitle } from "@patternfly/react-core/dist/esm/components/Card/index.js";
import { Label } from "@patternfly/react-core/dist/esm/components/Label/index.js";
import { Pagination } from "@patternfly/react-core/dist/esm/components/Pagination/index.js";
import { ExpandableRowContent, Table, Tbody, Td, Th, Thead, Tr } from "@patternfly/react-table/dist/esm/components/Table/index.js";

import { formatIds, hex2 } from "./ids.js";
import { label } from "./model.js";

const yes = (b, what) => <Label isCompact color={b ? "green" : "orange"} aria-label={`${what}: ${b ? "yes" : "no"}`}>{b ? "yes" : "no"}</Label>;

function Queues({ a, byUuid }) {
    const owners = new Map((a.Owners || []).map(([d, u]) => [d, u]));
    const overrides = new Map((a.DriverOverrides || []).map(([d, drv]) => [d, drv]));
    const guest = new Set(a.GuestDomains || []);
    return (
        <Table variant="compact" aria-label={`Queues of adapter ${hex2(a.Id)}`} className="queues" isStriped>
            <Thead><Tr><Th>Queue</Th><Th>Pool</Th><Th>Held by</Th><Th>driver_override</Th></Tr></Thead>
            <Tbody>
                {(a.Domains || []).map((d) => {
                    const u = owners.get(d);
                    const m = u && byUuid.get(u);
                    return (
                        <Tr key={d} data-queue={`${hex2(a.Id)}.${d.toString(16).padStart(4, "0")}`}>
                            <Td><code>{hex2(a.Id)}.{d.toString(16).padStart(4, "0")}</code></Td>
                            <Td>{guest.has(d) ? "reserved for guests (vfio_ap)" : "host pool"}</Td>
                            <Td>{u ? (m ? `${label(m)} (${u})` : u) : "—"}</Td>
                            <Td className="override">{overrides.has(d) ? <Label isCompact color="purple">{overrides.get(d)}</Label> : "—"}</Td>
                        </Tr>);
                })}
            </Tbody>
        </Table>
    );
}

/* One adapter; drawn again only when it, its holders' names or its queue list change. */
const AdapterRow = React.memo(function AdapterRow({ a, i, isOpen, toggle, held, byUuid }) {
    const overrides = a.DriverOverrides || [];
    return (
        <Tbody isExpanded={isOpen}>
            <Tr data-adapter={hex2(a.Id)}>
                <Td expand={{ rowIndex: i, isExpanded: isOpen, onToggle: () => toggle(a.Id), expandId: `adapter-${hex2(a.Id)}` }} />
                <Td dataLabel="Adapter" className="id"><code>{hex2(a.Id)}</code></Td>
                <Td dataLabel="Type" className="type">{a.Type}</Td>
                <Td dataLabel="Mode" className="mode">{a.Mode}</Td>
                <Td dataLabel="Online" className="online">{yes(a.Online, "online")}</Td>
                <Td dataLabel="Configured" className="configured">
                    {yes(a.Configured, "configured")}
                    {a.Checkstopped && <Label isCompact color="red" className="checkstopped">checkstopped</Label>}
                </Td>
                <Td dataLabel="Domains" className="ids">{formatIds(a.Domains || [])}</Td>
                <Td dataLabel="In vfio pool" className="ids">{formatIds(a.GuestDomains || [])}</Td>
                <Td dataLabel="Held by matrices" className="held">{held || "—"}</Td>
                <Td dataLabel="driver_override" className="overrides">
                    {overrides.length ? `${overrides.length} queue${overrides.length === 1 ? "" : "s"}: ` +
                        overrides.map(([dd, drv]) => `${hex2(a.Id)}.${dd.toString(16).padStart(4, "0")} → ${drv}`).slice(0, 3).join(", ") +
                        (overrides.length > 3 ? " …" : "") : "—"}
                </Td>
            </Tr>
            {isOpen && <Tr isExpanded className="queues-row">
                <Td colSpan={10}><ExpandableRowContent><Queues a={a} byUuid={byUuid} /></ExpandableRowContent></Td>
            </Tr>}
        </Tbody>
    );
});

export function AdaptersCard({ d }) {
    const [open, setOpen] = useState(new Set());
    const [page, setPage] = useState(1);
    const [perPage, setPerPage] = useState(20);
    const pages = Math.max(1, Math.ceil(d.adapters.length / perPage));
    const p = Math.min(page, pages);
    const rows = d.adapters.slice((p - 1) * perPage, p * perPage);
    const toggle = useCallback((id) => setOpen((o) => {
        const n = new Set(o);
        if (!n.delete(id)) n.add(id);
        return n;
    }), []);
    return (
        <Card id="adapters-card">
            <CardHeader><CardTitle component="h2" id="adapters-title">Adapters</CardTitle></CardHeader>
            <CardBody>
                {d.adapters.length > perPage &&
                    <Pagination id="adapters-pages" widgetId="adapters-pages-widget" isCompact itemCount={d.adapters.length} perPage={perPage} page={p}
                                titles={{ items: "adapters", paginationAriaLabel: "Adapter pages" }}
                                onSetPage={(ev, n) => setPage(n)} onPerPageSelect={(ev, n) => { setPerPage(n); setPage(1) }} />}
                <Table id="adapters" aria-labelledby="adapters-title" variant="compact">
                    <Thead>
                        <Tr>
                            <Th screenReaderText="Queues" />
                            {["Adapter", "Type", "Mode", "Online", "Configured", "Domains", "In vfio pool", "Held by matrices", "driver_override"]
                                .map((h) => <Th key={h} modifier="wrap">{h}</Th>)}
                        </Tr>
                    </Thead>
                    {rows.map((a, i) => (
                        <AdapterRow key={a.Id} a={a} i={i} isOpen={open.has(a.Id)} toggle={toggle}
                                    held={[...new Set((a.Owners || []).map(([, u]) => u))]
                                        .map((u) => { const m = d.byUuid.get(u); return m ? label(m) : u }).join(", ")}
                                    byUuid={open.has(a.Id) ? d.byUuid : null} />))}
                </Table>
            </CardBody>
        </Card>
    );
}
