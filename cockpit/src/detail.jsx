/*
 * A matrix's detail in the drawer: every property, who manages it (and Take over), the
 * reasons its guest lacks APQNs, the copy buttons, rename, autostart, assign and unassign with
 * a Check while typing. Changes of a matrix another tool manages are offered disabled.
 */
import React, { useEffect, useRef, useState } from "react";
import { DescriptionList, DescriptionListDescription, DescriptionListGroup, DescriptionListTerm } from "@patternfly/react-core/dist/esm/components/DescriptionList/index.js";
import { DrawerActions, DrawerCloseButton, DrawerHead, DrawerPanelBody, DrawerPanelContent } from "@patternfly/react-core/dist/esm/components/Drawer/index.js";
import { Form, FormGroup } from "@patternfly/react-core/dist/esm/components/Form/index.js";
import { FormSelect, FormSelectOption } from "@patternfly/react-core/dist/esm/components/FormSelect/index.js";
import { InputGroup, InputGroupItem } from "@patternfly/react-core/dist/esm/components/InputGroup/index.js";
import { TextInput } from "@patternfly/react-core/dist/esm/components/TextInput/index.js";
import { Title } from "@patternfly/react-core/dist/esm/components/Title/index.js";

import cockpit from "./cockpit.js";
import { usePage } from "./actions.js";
import { CheckResult, checkText } from "./forms.jsx";
import { formatIds, parseIds } from "./ids.js";
import { CopyButtons, LostList, ManagerLabel, MatrixActions, StateLabels, useLifecycle } from "./lifecycle.jsx";
import { MANAGERS, MATRIX, label, managerOf, notManaged } from "./model.js";
import { ChangeButton, ChangeSwitch } from "./widgets.jsx";

const KINDS = { Adapter: ["adapter", "adapters"], Domain: ["domain", "domains"], ControlDomain: ["control domain", "control_domains"] };

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
                <ChangeButton id="assign-submit" size="sm" variant="secondary" reason={notManaged(m)} onClick={() => submit("Assign")}>Assign</ChangeButton>
                <ChangeButton id="unassign-submit" size="sm" variant="secondary" reason={notManaged(m)} onClick={() => submit("Unassign")}>Unassign</ChangeButton>
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
                        <ChangeButton id="configure-rename" type="submit" variant="control" reason={notManaged(m) || (name.trim() === m.Name ? "the name is unchanged" : "")}>Rename</ChangeButton>
                    </InputGroupItem>
                </InputGroup>
            </FormGroup>
            <ChangeSwitch id="configure-autostart" label="Start at boot (autostart)" isChecked={m.Autostart} reason={notManaged(m)}
                          onChange={(ev, x) => configure(x ? "Autostart on for" : "Autostart off for", { autostart: cockpit.variant("b", x) })} />
        </Form>
    );
}

export function MatrixDetail({ m, tag, onClose }) {
    const { ask, dialog } = useLifecycle();
    const live = m.State !== "defined";
    const who = managerOf(m);
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
                <div className="btns detail-actions"><MatrixActions m={m} ask={ask} /></div>
                <DescriptionList isCompact isHorizontal className="detail-list">
                    {item("UUID", <code>{m.Uuid}</code>)}
                    {item("Managed by", <>
                        <ManagerLabel m={m} />
                        {who !== "apmatrixd" && <div id="detail-not-managed" className="muted">
                            {MANAGERS[who] ? MANAGERS[who].text : who}. {notManaged(m)}
                        </div>}
                    </>, "detail-manager")}
                    {item("State", <StateLabels m={m} />, "detail-state")}
                    {item("Adapters", <code>{formatIds(m.Adapters || [])}</code>)}
                    {item("Usage domains", <code>{formatIds(m.Domains || [])}</code>)}
                    {item("Control domains", <>
                        <code>{formatIds(m.ControlDomains || [])}</code>
                        {m.ControlUsageDomains && <div className="muted">every usage domain is one too</div>}
                    </>)}
                    {item("APQNs", `${(m.Apqns || []).length} assigned; the guest gets ${live ? (m.GuestApqns || []).length : "none (not live)"}`)}
                    {(m.Lost || []).length > 0 && item("Not given to the guest", <LostList m={m} />, "detail-lost")}
                    {item("sysfsdev", <><code className="sysfs">{m.SysfsPath}</code>
                        <div><CopyButtons m={m} /></div></>, "detail-sysfs")}
                </DescriptionList>
                <ConfigureForm m={m} />
                <AssignForm m={m} />
                {dialog}
            </DrawerPanelBody>
        </DrawerPanelContent>
    );
}
