/*
 * The matrices: a filtered, paged table (a host may have a thousand) with start, stop, remove
 * and copy of the sysfsdev; a matrix's detail in the drawer (every property, the reasons its
 * guest lacks APQNs, rename, autostart, assign and unassign with a Check while typing).
 */
import React, { useCallback, useEffect, useRef, useState } from "react";
import { Button } from "@patternfly/react-core/dist/esm/components/Button/index.js";
import { Card, CardBody, CardHeader, CardTitle } from "@patternfly/react-core/dist/esm/components/Card/index.js";
import { Checkbox } from "@patternfly/react-core/dist/esm/components/Checkbox/index.js";
import { DescriptionList, DescriptionListDescription, DescriptionListGroup, DescriptionListTerm } from "@patternfly/react-core/dist/esm/components/DescriptionList/index.js";
import { DrawerActions, DrawerCloseButton, DrawerHead, DrawerPanelBody, DrawerPanelContent } from "@patternfly/react-core/dist/esm/components/Drawer/index.js";
import { Form, FormGroup } from "@patternfly/react-core/dist/esm/components/Form/index.js";
import { FormSelect, FormSelectOption } from "@patternfly/react-core/dist/esm/components/FormSelect/index.js";
import { InputGroup, InputGroupItem } from "@patternfly/react-core/dist/esm/components/InputGroup/index.js";
import { Label } from "@patternfly/react-core/dist/esm/components/Label/index.js";
import { Modal, ModalBody, ModalFooter, ModalHeader } from "@patternfly/react-core/dist/esm/components/Modal/index.js";
import { Pagination } from "@patternfly/react-core/dist/esm/components/Pagination/index.js";
import { SearchInput } from "@patternfly/react-core/dist/esm/components/SearchInput/index.js";
import { Switch } from "@patternfly/react-core/dist/esm/components/Switch/index.js";
import { TextInput } from "@patternfly/react-core/dist/esm/components/TextInput/index.js";
import { Title } from "@patternfly/react-core/dist/esm/components/Title/index.js";
import { Toolbar, ToolbarContent, ToolbarGroup, ToolbarItem } from "@patternfly/react-core/dist/esm/components/Toolbar/index.js";
import { Tooltip } from "@patternfly/react-core/dist/esm/components/Tooltip/index.js";
import { Table, Tbody, Td, Th, Thead, Tr } from "@patternfly/react-table/dist/esm/components/Table/index.js";
import CopyIcon from "@patternfly/react-icons/dist/esm/icons/copy-icon.js";

import cockpit from "./cockpit.js";
import { usePage } from "./actions.js";
import { CheckResult, checkText } from "./forms.jsx";
import { apqnName, formatIds, parseIds } from "./ids.js";
import { MATRIX, label } from "./model.js";
import { ChangeButton } from "./widgets.jsx";

const STATE_COLOUR = { active: "green", defined: "blue", degraded: "orange" };
const KINDS = { Adapter: ["adapter", "adapters"], Domain: ["domain", "domains"], ControlDomain: ["control domain", "control_domains"] };

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

export function CopyButton({ text, what, className }) {
    const [copied, setCopied] = useState("");
    const copy = () => {
        const api = navigator.clipboard && window.isSecureContext
            ? navigator.clipboard.writeText(text)
            : Promise.reject(new Error("no clipboard API"));
        const done = (ok) => {
            setCopied(ok ? "true" : "false");
            window.setTimeout(() => setCopied(""), 3000);
        };
        api.then(() => done(true), () => done(legacyCopy(text)));
    };
    return (
        <Tooltip content={copied === "true" ? "Copied" : copied === "false" ? "Copy failed" : `Copy ${what}`}>
            <Button variant="plain" size="sm" className={"copy " + (className || "")} icon={<CopyIcon />}
                    aria-label={`Copy ${what}`} data-copied={copied} onClick={copy} />
        </Tooltip>
    );
}

/* -- start, stop, remove ------------------------------------------------------------------- */
function useLifecycle() {
    const { model, act } = usePage();
    const [confirm, setConfirm] = useState(null); /* { verb, m } */
    const run = (verb, m, force) => {
        const method = force ? verb + "WithOptions" : verb;
        const args = force ? [{ force: cockpit.variant("b", true) }] : [];
        return act(`${verb} ${label(m)}`, model.call(m.path, MATRIX, method, args, force ? "a{sv}" : undefined),
            verb === "Remove" ? `Removed ${label(m)}` : undefined);
    };
    /* Remove always asks first; Stop only when a guest runs with the matrix (then it offers force). */
    const ask = (verb, m) => (verb === "Stop" && !m.InUse ? run(verb, m, false) : setConfirm({ verb, m }));
    const dialog = confirm && <ConfirmDialog {...confirm} onClose={() => setConfirm(null)} run={run} />;
    return { ask, run, dialog };
}

function ConfirmDialog({ verb, m, run, onClose }) {
    const [force, setForce] = useState(false);
    const title = `${verb} ${label(m)}?`;
    const text = verb === "Remove"
        ? "Its definition is forgotten and its APQNs become free for other matrices."
        : "It stays defined and keeps its APQNs; its guest loses them.";
    return (
        <Modal id="confirm-dialog" isOpen variant="small" onClose={onClose} aria-labelledby="confirm-title">
            <ModalHeader title={title} labelId="confirm-title" titleIconVariant={verb === "Remove" ? "warning" : undefined} />
            <ModalBody>
                <p>{text}</p>
                {m.InUse && <>
                    <p className="in-use-warning">A guest runs with this matrix: apmatrixd refuses unless told to take it from the guest.</p>
                    <Checkbox id="confirm-force" label="Take it from the running guest (force)" isChecked={force} onChange={(ev, x) => setForce(x)} />
                </>}
            </ModalBody>
            <ModalFooter>
                <ChangeButton id="confirm-submit" variant={verb === "Remove" ? "danger" : "primary"}
                              onClick={() => { onClose(); run(verb, m, force) }}>{verb}</ChangeButton>
                <Button id="confirm-cancel" variant="link" onClick={onClose}>Cancel</Button>
            </ModalFooter>
        </Modal>
    );
}

function StateLabels({ m }) {
    return <>
        <Label isCompact color={STATE_COLOUR[m.State] || "grey"} className={"state-" + m.State}>{m.State}</Label>
        {m.Autostart && <Label isCompact variant="outline">autostart</Label>}
        {m.Adopted && <Tooltip content="found live at start-up"><Label isCompact variant="outline" tabIndex={0}>adopted</Label></Tooltip>}
        {m.InUse && <Tooltip content="a guest runs with it: Stop and Remove need force"><Label isCompact color="yellow" className="in-use" tabIndex={0}>in use</Label></Tooltip>}
    </>;
}

function guestText(m) {
    return m.State === "defined" ? "not live" : `${(m.GuestApqns || []).length} of ${(m.Apqns || []).length} APQNs`;
}

function LostList({ lost, limit }) {
    if (!lost || !lost.length) return null;
    const shown = limit ? lost.slice(0, limit) : lost;
    return (
        <ul className="lost" aria-label="APQNs the guest does not get">
            {shown.map(([a, d, why]) => <li key={a * 65536 + d}>{apqnName(a, d)}: {why}</li>)}
            {shown.length < lost.length && <li>… and {lost.length - shown.length} more (see Details)</li>}
        </ul>
    );
}

const MatrixRow = React.memo(function MatrixRow({ m, tag, isSelected, ask, select }) {
    const live = m.State !== "defined";
    return (
        <Tr data-uuid={m.Uuid} isRowSelected={isSelected}>
            <Td dataLabel="Name" className="name">
                <span className="swatch owned" style={{ "--owner": tag.colour }} aria-hidden="true">{tag.tag}</span>
                {m.Name || <span className="muted">(unnamed)</span>}
            </Td>
            <Td dataLabel="UUID"><code>{m.Uuid}</code></Td>
            <Td dataLabel="State" className="state" data-state={m.State}><StateLabels m={m} /></Td>
            <Td dataLabel="Adapters" className="ids adapters">{formatIds(m.Adapters || [])}</Td>
            <Td dataLabel="Domains" className="ids domains">{formatIds(m.Domains || [])}</Td>
            <Td dataLabel="Control" className="ids control">{formatIds(m.ControlDomains || [])}</Td>
            <Td dataLabel="Guest sees" className="guest" title={(m.GuestApqns || []).map(([a, d]) => apqnName(a, d)).join(" ")}>
                {guestText(m)}
                <LostList lost={m.Lost} limit={3} />
            </Td>
            <Td dataLabel="sysfsdev" className="sysfs-cell">
                <code className="sysfs">{m.SysfsPath}</code>
                <CopyButton text={m.SysfsPath} what="the sysfsdev (QEMU -device vfio-ap,sysfsdev=…, libvirt <hostdev>)" />
            </Td>
            <Td dataLabel="Actions" className="actions">
                <div className="btns">
                    {live
                        ? <ChangeButton size="sm" variant="secondary" className="stop" onClick={() => ask("Stop", m)}>Stop</ChangeButton>
                        : <ChangeButton size="sm" variant="secondary" className="start" onClick={() => ask("Start", m)}>Start</ChangeButton>}
                    <ChangeButton size="sm" variant="danger" className="remove" onClick={() => ask("Remove", m)}>Remove</ChangeButton>
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
    return [m.Name, m.Uuid, m.State, formatIds(m.Adapters || []), formatIds(m.Domains || [])]
        .some((s) => s && s.toLowerCase().includes(t));
}

export function MatricesCard({ d }) {
    const { select, selected } = usePage();
    const [filter, setFilter] = useState("");
    const [page, setPage] = useState(1);
    const [perPage, setPerPage] = useState(20);
    const { ask, run, dialog } = useLifecycle();
    /* One function for every row's buttons, so that a row is drawn again only when its
       matrix changes (a host may have a thousand). */
    const latest = useRef(null);
    latest.current = { ask, run };
    const askOrRun = useCallback((verb, m) => (verb === "Start" ? latest.current.run("Start", m, false) : latest.current.ask(verb, m)), []);

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
                            <SearchInput id="matrix-filter" aria-label="Filter matrices" placeholder="Filter by name, UUID, state or id"
                                         value={filter} onChange={(ev, x) => { setFilter(x); setPage(1) }} onClear={() => setFilter("")} />
                        </ToolbarItem>
                        {/* The place for "Apply a layout" (the declared-state dry run and apply). */}
                        <ToolbarGroup id="matrices-tools" />
                        <ToolbarItem variant="pagination" align={{ default: "alignEnd" }}>{pager("top")}</ToolbarItem>
                    </ToolbarContent>
                </Toolbar>
                <Table id="matrices" aria-labelledby="matrices-title" variant="compact">
                    <Thead>
                        <Tr>
                            {["Name", "UUID", "State", "Adapters", "Domains", "Control", "Guest sees", "sysfsdev"]
                                .map((h) => <Th key={h} modifier="wrap">{h}</Th>)}
                            <Th screenReaderText="Actions" />
                        </Tr>
                    </Thead>
                    <Tbody>
                        {rows.map((m) => <MatrixRow key={m.Uuid} m={m} tag={d.tags.get(m.Uuid)} isSelected={selected === m.Uuid}
                                                    ask={askOrRun} select={select} />)}
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

/* -- the detail drawer --------------------------------------------------------------------- */
function AssignForm({ m }) {
    const { model, act, addAlert, check, clear, byUuid } = usePage();
    const [kind, setKind] = useState("Domain");
    const [text, setText] = useState("");
    const [result, setResult] = useState(checkText(null));
    const owner = "assign:" + m.Uuid;

    /* While ids are typed, Check what assigning them would add (control domains are shared:
       nothing to check). */
    useEffect(() => {
        let ids = [];
        try {
            ids = parseIds(text, "ids");
        } catch (e) {
            ids = [];
        }
        if (kind === "ControlDomain" || !ids.length) {
            clear(owner);
            setResult(checkText(null));
            return;
        }
        const ads = kind === "Adapter" ? [...new Set([...m.Adapters, ...ids])] : m.Adapters;
        const doms = kind === "Domain" ? [...new Set([...m.Domains, ...ids])] : m.Domains;
        check(owner, ads, doms, m.Uuid).then((r) => { if (r !== undefined) setResult(checkText(r, byUuid())) });
    }, [text, kind, m.Uuid]); // eslint-disable-line react-hooks/exhaustive-deps
    useEffect(() => () => clear(owner), [owner]); // eslint-disable-line react-hooks/exhaustive-deps

    const submit = (verb) => {
        let ids;
        try {
            ids = parseIds(text, KINDS[kind][0]);
        } catch (e) {
            addAlert({ variant: "danger", title: `${verb} on ${label(m)}: ${e.message}` });
            return;
        }
        if (!ids.length) {
            addAlert({ variant: "danger", title: `${verb} on ${label(m)}: give at least one id` });
            return;
        }
        const sets = { adapters: [], domains: [], control_domains: [] };
        sets[KINDS[kind][1]] = ids;
        const options = { mode: cockpit.variant("s", verb === "Assign" ? "add" : "remove"), sets: cockpit.variant("as", [KINDS[kind][1]]) };
        act(`${verb} ${KINDS[kind][0]} ${formatIds(ids)} on ${label(m)}`,
            model.call(m.path, MATRIX, "UpdateWithOptions", [sets.adapters, sets.domains, sets.control_domains, options], "auauaua{sv}"))
            .then((reply) => { if (reply) setText("") });
    };
    return (
        <Form id="assign-form" onSubmit={(ev) => { ev.preventDefault(); submit("Assign") }}>
            <FormGroup label="Assign or unassign" fieldId="assign-id">
                <InputGroup>
                    <InputGroupItem>
                        <FormSelect id="assign-kind" className="kind" value={kind} onChange={(ev, x) => setKind(x)} aria-label="What to assign">
                            {Object.entries(KINDS).map(([k, [name]]) => <FormSelectOption key={k} value={k} label={name} />)}
                        </FormSelect>
                    </InputGroupItem>
                    <InputGroupItem isFill>
                        <TextInput id="assign-id" className="assign-id" value={text} onChange={(ev, x) => setText(x)}
                                   placeholder="ids, e.g. 47 or 04-07" aria-label="Ids (hexadecimal)" autoComplete="off" />
                    </InputGroupItem>
                </InputGroup>
            </FormGroup>
            <CheckResult id="assign-check" result={result} />
            <div className="btns">
                <ChangeButton id="assign-submit" size="sm" variant="secondary" onClick={() => submit("Assign")}>Assign</ChangeButton>
                <ChangeButton id="unassign-submit" size="sm" variant="secondary" onClick={() => submit("Unassign")}>Unassign</ChangeButton>
            </div>
        </Form>
    );
}

function ConfigureForm({ m }) {
    const { model, act } = usePage();
    const [name, setName] = useState(m.Name);
    const shownFor = useRef(m.Uuid);
    if (shownFor.current !== m.Uuid) {
        shownFor.current = m.Uuid;
        setName(m.Name);
    }
    const configure = (what, options) => act(`${what} ${label(m)}`, model.call(m.path, MATRIX, "Configure", [options], "a{sv}"));
    return (
        <Form id="configure-form" onSubmit={(ev) => { ev.preventDefault(); configure("Rename", { name: cockpit.variant("s", name.trim()) }) }}>
            <FormGroup label="Name" fieldId="configure-name">
                <InputGroup>
                    <InputGroupItem isFill>
                        <TextInput id="configure-name" value={name} onChange={(ev, x) => setName(x)} autoComplete="off" />
                    </InputGroupItem>
                    <InputGroupItem>
                        <ChangeButton id="configure-rename" type="submit" variant="control" reason={name.trim() === m.Name ? "the name is unchanged" : ""}>Rename</ChangeButton>
                    </InputGroupItem>
                </InputGroup>
            </FormGroup>
            <ChangeSwitch id="configure-autostart" label="Start at boot (autostart)" isChecked={m.Autostart}
                          onChange={(ev, x) => configure(x ? "Autostart on for" : "Autostart off for", { autostart: cockpit.variant("b", x) })} />
        </Form>
    );
}

function ChangeSwitch(props) {
    const { admin, adminReason } = usePage();
    const sw = <Switch {...props} isDisabled={!admin} aria-describedby={admin ? undefined : "admin-reason"} />;
    return admin ? sw : <Tooltip content={adminReason}><span>{sw}</span></Tooltip>;
}

export function MatrixDetail({ m, tag, onClose }) {
    const { ask, run, dialog } = useLifecycle();
    const live = m.State !== "defined";
    const item = (term, desc, cls) => (
        <DescriptionListGroup className={cls}>
            <DescriptionListTerm>{term}</DescriptionListTerm>
            <DescriptionListDescription>{desc}</DescriptionListDescription>
        </DescriptionListGroup>
    );
    return (
        <DrawerPanelContent id="matrix-detail" widths={{ default: "width_33" }} data-uuid={m.Uuid} aria-label={`Matrix ${label(m)}`}>
            <DrawerHead>
                <Title headingLevel="h2" size="xl">
                    <span className="swatch owned" style={{ "--owner": tag.colour }} aria-hidden="true">{tag.tag}</span>
                    {m.Name || m.Uuid}
                </Title>
                <DrawerActions><DrawerCloseButton onClick={onClose} aria-label="Close details" /></DrawerActions>
            </DrawerHead>
            <DrawerPanelBody>
                <div className="btns detail-actions">
                    {live
                        ? <ChangeButton size="sm" variant="secondary" className="stop" onClick={() => ask("Stop", m)}>Stop</ChangeButton>
                        : <ChangeButton size="sm" variant="secondary" className="start" onClick={() => run("Start", m, false)}>Start</ChangeButton>}
                    <ChangeButton size="sm" variant="danger" className="remove" onClick={() => ask("Remove", m)}>Remove</ChangeButton>
                </div>
                <DescriptionList isCompact isHorizontal className="detail-list">
                    {item("UUID", <code>{m.Uuid}</code>)}
                    {item("State", <StateLabels m={m} />, "detail-state")}
                    {item("Adapters", <code>{formatIds(m.Adapters || [])}</code>)}
                    {item("Usage domains", <code>{formatIds(m.Domains || [])}</code>)}
                    {item("Control domains", <>
                        <code>{formatIds(m.ControlDomains || [])}</code>
                        {m.ControlUsageDomains && <div className="muted">every usage domain is one too</div>}
                    </>)}
                    {item("APQNs", `${(m.Apqns || []).length} assigned; the guest gets ${live ? (m.GuestApqns || []).length : "none (not live)"}`)}
                    {(m.Lost || []).length > 0 && item("Not given to the guest", <LostList lost={m.Lost} />, "detail-lost")}
                    {item("sysfsdev", <span className="sysfs-cell"><code className="sysfs">{m.SysfsPath}</code>
                        <CopyButton text={m.SysfsPath} what="the sysfsdev" /></span>)}
                    {/* Who manages the matrix (apmatrixd, mdevctl, another tool), taking it over,
                        and copying the libvirt <hostdev> and nodedev XML go here. */}
                </DescriptionList>
                <ConfigureForm m={m} />
                <AssignForm m={m} />
                {dialog}
            </DrawerPanelBody>
        </DrawerPanelContent>
    );
}
