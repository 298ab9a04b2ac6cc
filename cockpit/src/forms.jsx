/* Create a matrix (its Check runs while the ids are typed) and the host pool (Reserve, Release,
   and what chzdev's persistent masks make of it at boot). */
import React, { useEffect, useRef, useState } from "react";
import { ActionGroup, Form, FormGroup } from "@patternfly/react-core/dist/esm/components/Form/index.js";
import { Button } from "@patternfly/react-core/dist/esm/components/Button/index.js";
import { Card, CardBody, CardHeader, CardTitle } from "@patternfly/react-core/dist/esm/components/Card/index.js";
import { Alert } from "@patternfly/react-core/dist/esm/components/Alert/index.js";
import { Checkbox } from "@patternfly/react-core/dist/esm/components/Checkbox/index.js";
import { Content } from "@patternfly/react-core/dist/esm/components/Content/index.js";
import { TextInput } from "@patternfly/react-core/dist/esm/components/TextInput/index.js";

import cockpit from "./cockpit.js";
import { usePage } from "./actions.js";
import { ownerLabel } from "./grid.jsx";
import { apqnName, formatIds, parseIds } from "./ids.js";
import { MANAGER, ROOT, unvariant } from "./model.js";
import { ChangeButton } from "./widgets.jsx";

/* What a Check answered, as one line for the form. */
export function checkText(result, byUuid) {
    if (!result) return { kind: "", text: "", count: "" };
    if (result.error) return { kind: "error", text: `${result.error.title}${result.error.detail ? ": " + result.error.detail : ""}`, count: -1 };
    const { clashes, size } = result;
    if (!clashes.length) return { kind: "ok", text: `No clashes: all ${size} APQNs are free for this matrix.`, count: 0 };
    const host = clashes.filter(([, , o]) => o === "host");
    const taken = clashes.filter(([, , o]) => o !== "host");
    const lines = [];
    if (taken.length)
        lines.push("Held by another matrix: " + taken.map(([a, d, o]) => `${apqnName(a, d)} (${ownerLabel(o, byUuid)})`).join(", "));
    if (host.length)
        lines.push("Still in the host pool, reserve first: " + host.map(([a, d]) => apqnName(a, d)).join(", "));
    return { kind: "clash", text: `${clashes.length} clash${clashes.length === 1 ? "" : "es"}. ` + lines.join(". "), count: clashes.length };
}

export function CheckResult({ id, result }) {
    return (
        <div id={id} className={"check-result" + (result.kind ? " check-" + result.kind : "")}
             data-clashes={String(result.count)} aria-live="polite">{result.text}</div>
    );
}

const EMPTY = { name: "", uuid: "", adapters: "", domains: "", control: "", start: true, autostart: false };

/* version: the daemon's state while this form's Check is shown (0 otherwise), so that another
   admin's change checks again. */
export const CreateCard = React.memo(function CreateCard({ version }) {
    const { model, act, addAlert, check, clear, byUuid } = usePage();
    const [v, setV] = useState(EMPTY);
    const [result, setResult] = useState(checkText(null));
    const [busy, setBusy] = useState(false);
    const timer = useRef(null);
    const set = (field) => (ev, value) => setV((old) => ({ ...old, [field]: value }));

    const inputs = (form) => ({
        adapters: parseIds(form.adapters, "Adapters"),
        domains: parseIds(form.domains, "Usage domains"),
        control: form.control.trim() ? parseIds(form.control, "Control domains") : null,
    });

    /* Check as the ids are typed, and again when another admin's change may have made or
       settled a clash (the daemon's state moved on: a new version). */
    const typed = v.adapters.trim() || v.domains.trim() || v.control.trim();
    useEffect(() => {
        window.clearTimeout(timer.current);
        if (!typed) {
            clear("create");
            setResult(checkText(null));
            return;
        }
        timer.current = window.setTimeout(() => {
            let ids;
            try {
                ids = inputs(v);
            } catch (e) {
                clear("create");
                setResult({ kind: "error", text: e.message, count: -1 });
                return;
            }
            check("create", ids.adapters, ids.domains, "").then((r) => {
                if (r !== undefined) setResult(checkText(r, byUuid()));
            });
        }, 150);
    }, [v.adapters, v.domains, v.control, version]); // eslint-disable-line react-hooks/exhaustive-deps

    const submit = (ev) => {
        ev.preventDefault();
        let ids;
        try {
            ids = inputs(v);
        } catch (e) {
            addAlert({ variant: "danger", title: `Create: ${e.message}` });
            return;
        }
        const name = v.name.trim();
        const options = {
            adapters: cockpit.variant("au", ids.adapters),
            domains: cockpit.variant("au", ids.domains),
            name: cockpit.variant("s", name),
            start: cockpit.variant("b", v.start),
            autostart: cockpit.variant("b", v.autostart),
        };
        if (ids.control) options.control_domains = cockpit.variant("au", ids.control);
        setBusy(true);
        act(name ? `Create ${name}` : "Create",
            model.call(ROOT, MANAGER, "CreateMatrix", [v.uuid.trim(), options], "sa{sv}"),
            `Created matrix ${name}`.trim())
            .then((reply) => {
                setBusy(false);
                if (reply) setV(EMPTY);
            });
    };

    const field = (id, fieldName, labelText, placeholder) => (
        <FormGroup label={labelText} fieldId={id}>
            <TextInput id={id} value={v[fieldName]} onChange={set(fieldName)} placeholder={placeholder} autoComplete="off" />
        </FormGroup>
    );
    return (
        <Card id="create-card">
            <CardHeader><CardTitle component="h2">Create a matrix</CardTitle></CardHeader>
            <CardBody>
                <Form id="create-form" isHorizontal onSubmit={submit} onReset={(ev) => { ev.preventDefault(); setV(EMPTY) }}>
                    {field("create-name", "name", "Name", "guest1")}
                    {field("create-uuid", "uuid", "UUID", "generated if empty")}
                    {field("create-adapters", "adapters", "Adapters", "05 06")}
                    {field("create-domains", "domains", "Usage domains", "04 47")}
                    {field("create-control", "control", "Control domains", "as usage domains")}
                    <FormGroup role="group" label="Options" fieldId="create-start" isInline>
                        <Checkbox id="create-start" label="Start now" isChecked={v.start} onChange={set("start")} />
                        <Checkbox id="create-autostart" label="Autostart at boot" isChecked={v.autostart} onChange={set("autostart")} />
                    </FormGroup>
                    <FormGroup label="Check" fieldId="create-check">
                        <CheckResult id="create-check" result={result} />
                        <Content component="small" className="hint">
                            Runs as you type; nothing is changed until Create. Ids are hexadecimal, as <code>lszcrypt</code> prints
                            them; ranges like <code>04-07</code> work.
                        </Content>
                    </FormGroup>
                    <ActionGroup>
                        <ChangeButton id="create-submit" type="submit" variant="primary" isLoading={busy} reason={busy ? "creating…" : ""}>Create</ChangeButton>
                        <Button id="create-clear" type="reset" variant="link">Clear</Button>
                    </ActionGroup>
                </Form>
            </CardBody>
        </Card>
    );
});

/* Manager.BootHostPool: the host pool chzdev's udev rule sets at boot, and where apmatrixd's
   own reservations (applied again at every boot) disagree with it. */
function BootPool({ value }) {
    const pool = unvariant(value || {});
    if (!pool.file) {
        return <Content component="small" id="boot-pool" className="hint" data-file="">
            At boot: no persistent AP masks from chzdev (<code>41-ap.rules</code>); the host boots with the kernel&apos;s, then apmatrixd reserves its own.
        </Content>;
    }
    const ids = (list, mask) => (list ? formatIds(list) : `as the kernel boots (chzdev keeps no ${mask})`);
    return (
        <div id="boot-pool" className="boot-pool" data-file={pool.file}>
            <div>At boot (chzdev, <code>{pool.file}</code>):</div>
            {pool.error
                ? <div id="boot-pool-error" className="muted">not used: the file {pool.error}</div>
                : <>
                    <div>for guests: adapters <code id="boot-pool-adapters">{ids(pool.reserved_adapters, "apmask")}</code></div>
                    <div>× domains <code id="boot-pool-domains">{ids(pool.reserved_domains, "aqmask")}</code></div>
                </>}
            {pool.drift &&
                <Alert id="boot-pool-drift" isInline isPlain variant="warning" title="chzdev and apmatrixd disagree about the host pool at boot">
                    <p id="boot-pool-drift-text">{pool.drift}.</p>
                    <p>After a reboot the host pool depends on whether udev&apos;s rule or apmatrixd runs last: make them agree
                        (<code>chzdev -t ap apmask=… aqmask=… -p</code>, or Reserve and Release here).</p>
                </Alert>}
        </div>
    );
}

export const PoolCard = React.memo(function PoolCard({ manager }) {
    const { model, act, addAlert } = usePage();
    const [ads, setAds] = useState("");
    const [doms, setDoms] = useState("");
    const pool = (method) => {
        let a, dd;
        try {
            a = parseIds(ads, "Adapters");
            dd = parseIds(doms, "Domains");
        } catch (e) {
            addAlert({ variant: "danger", title: `${method}: ${e.message}` });
            return;
        }
        act(method, model.call(ROOT, MANAGER, method, [a, dd], "auau"),
            `${method}d adapters ${formatIds(a)}, domains ${formatIds(dd)}`);
    };
    return (
        <Card id="pool-card">
            <CardHeader><CardTitle component="h2">Host pool</CardTitle></CardHeader>
            <CardBody>
                <Content component="p" className="hint">
                    An APQN must be reserved (taken from the host&apos;s own drivers: <code>apmask</code>/<code>aqmask</code>) before a matrix may hold it;
                    an APQN stays with the host while both its adapter and its domain do.
                </Content>
                <div id="pool-info" className="pool-info">
                    <div>Host keeps adapters <code id="pool-adapters-now">{formatIds(manager ? manager.HostAdapters : [])}</code></div>
                    <div>× domains <code id="pool-domains-now">{formatIds(manager ? manager.HostDomains : [])}</code></div>
                </div>
                {manager && <BootPool value={manager.BootHostPool} />}
                <Form id="pool-form" isHorizontal onSubmit={(ev) => ev.preventDefault()}>
                    <FormGroup label="Adapters" fieldId="pool-adapters">
                        <TextInput id="pool-adapters" value={ads} onChange={(ev, x) => setAds(x)} placeholder="05 06" autoComplete="off" />
                    </FormGroup>
                    <FormGroup label="Domains" fieldId="pool-domains">
                        <TextInput id="pool-domains" value={doms} onChange={(ev, x) => setDoms(x)} placeholder="04 47" autoComplete="off" />
                    </FormGroup>
                    <ActionGroup>
                        <ChangeButton id="pool-reserve" variant="primary" onClick={() => pool("Reserve")}>Reserve for guests</ChangeButton>
                        <ChangeButton id="pool-release" variant="secondary" onClick={() => pool("Release")}>Release to host</ChangeButton>
                    </ActionGroup>
                </Form>
            </CardBody>
        </Card>
    );
});
