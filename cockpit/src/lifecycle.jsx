/*
 * What the matrix table and the detail drawer share: start, stop, remove and take over (with
 * their confirmations), the state and manager labels, the APQNs a guest lacks and the copy
 * buttons for QEMU and libvirt. A matrix another tool manages offers no change, only Take over.
 */
import React, { useState } from "react";
import { Button } from "@patternfly/react-core/dist/esm/components/Button/index.js";
import { Checkbox } from "@patternfly/react-core/dist/esm/components/Checkbox/index.js";
import { Label } from "@patternfly/react-core/dist/esm/components/Label/index.js";
import { Modal, ModalBody, ModalFooter, ModalHeader } from "@patternfly/react-core/dist/esm/components/Modal/index.js";
import { Tooltip } from "@patternfly/react-core/dist/esm/components/Tooltip/index.js";

import cockpit from "./cockpit.js";
import { usePage } from "./actions.js";
import { apqnName } from "./ids.js";
import { MANAGERS, MATRIX, label, managerOf, notManaged } from "./model.js";
import { ChangeButton, CopyButton } from "./widgets.jsx";

const STATE_COLOUR = { active: "green", defined: "blue", degraded: "orange" };
const MANAGER_COLOUR = { mdevctl: "purple", external: "orangered" };

export function useLifecycle() {
    const { model, act } = usePage();
    const [confirm, setConfirm] = useState(null); /* { verb, m } */
    const run = (verb, m, force) => {
        const method = force ? verb + "WithOptions" : verb;
        const args = force ? [{ force: cockpit.variant("b", true) }] : [];
        const what = verb === "TakeOver" ? "Take over" : verb;
        const success = verb === "Remove" ? `Removed ${label(m)}` : verb === "TakeOver" ? `apmatrixd manages ${label(m)} now` : undefined;
        return act(`${what} ${label(m)}`, model.call(m.path, MATRIX, method, args, force ? "a{sv}" : undefined), success);
    };
    /* Remove and Take over always ask first; Stop only when a guest runs with the matrix
       (then it offers force); Start never. */
    const ask = (verb, m) => (verb === "Start" || (verb === "Stop" && !m.InUse) ? run(verb, m, false) : setConfirm({ verb, m }));
    const dialog = confirm && <ConfirmDialog {...confirm} onClose={() => setConfirm(null)} run={run} />;
    return { ask, dialog };
}

function takeOverText(m) {
    const who = managerOf(m);
    const sets = m.State === "defined" ? "its definition's sets" : "the sets the kernel holds now";
    return <>
        <p>apmatrixd stores {label(m)} in its own state directory with {sets} and manages it from then on:
            it can be changed, started, stopped and removed here and with apmatrixctl, and every change is
            checked first.</p>
        {who === "mdevctl"
            ? <p>mdevctl&apos;s file stays, but is apmatrixd&apos;s from now on: apmatrixd&apos;s export writes it and
                Remove removes it; mdevctl is no longer the one to change it.</p>
            : <p>If a tool made it (KubeVirt, a CEX DRA driver), that tool no longer decides about it:
                what it changes later is drift, and Remove here takes the matrix from it.</p>}
    </>;
}

function ConfirmDialog({ verb, m, run, onClose }) {
    const [force, setForce] = useState(false);
    const title = verb === "TakeOver" ? `Take over ${label(m)} from ${MANAGERS[managerOf(m)].name}?` : `${verb} ${label(m)}?`;
    const text = verb === "TakeOver" ? takeOverText(m)
        : <p>{verb === "Remove"
            ? "Its definition is forgotten and its APQNs become free for other matrices."
            : "It stays defined and keeps its APQNs; its guest loses them."}</p>;
    return (
        <Modal id="confirm-dialog" isOpen variant="small" onClose={onClose} aria-labelledby="confirm-title" aria-describedby="confirm-body">
            <ModalHeader title={title} labelId="confirm-title" titleIconVariant={verb === "Remove" ? "warning" : undefined} />
            <ModalBody id="confirm-body">
                {text}
                {verb !== "TakeOver" && m.InUse && <>
                    <p className="in-use-warning">A guest runs with this matrix: apmatrixd refuses unless told to take it from the guest.</p>
                    <Checkbox id="confirm-force" label="Take it from the running guest (force)" isChecked={force} onChange={(ev, x) => setForce(x)} />
                </>}
            </ModalBody>
            <ModalFooter>
                <ChangeButton id="confirm-submit" variant={verb === "Remove" ? "danger" : "primary"}
                              onClick={() => { onClose(); run(verb, m, force) }}>{verb === "TakeOver" ? "Take over" : verb}</ChangeButton>
                <Button id="confirm-cancel" variant="link" onClick={onClose}>Cancel</Button>
            </ModalFooter>
        </Modal>
    );
}

/* Start or Stop, Remove, and Take over for a matrix that is not apmatrixd's. */
export function MatrixActions({ m, ask }) {
    const live = m.State !== "defined";
    const theirs = notManaged(m);
    return <>
        {live
            ? <ChangeButton size="sm" variant="secondary" className="stop" reason={theirs} onClick={() => ask("Stop", m)}>Stop</ChangeButton>
            : <ChangeButton size="sm" variant="secondary" className="start" reason={theirs} onClick={() => ask("Start", m)}>Start</ChangeButton>}
        <ChangeButton size="sm" variant="danger" className="remove" reason={theirs} onClick={() => ask("Remove", m)}>Remove</ChangeButton>
        {theirs && <ChangeButton size="sm" variant="secondary" className="takeover" onClick={() => ask("TakeOver", m)}>Take over</ChangeButton>}
    </>;
}

export function ManagerLabel({ m }) {
    const who = managerOf(m);
    if (who === "apmatrixd") return <span className="manager-name">apmatrixd</span>;
    const info = MANAGERS[who] || { short: who, text: "" };
    return (
        <Tooltip content={`${info.text}. apmatrixd counts its APQNs in every decision but changes it only after Take over.`}>
            <Label isCompact color={MANAGER_COLOUR[who] || "grey"} className={"manager-" + who} tabIndex={0}>{info.short}</Label>
        </Tooltip>
    );
}

export function StateLabels({ m }) {
    return <>
        <Label isCompact color={STATE_COLOUR[m.State] || "grey"} className={"state-" + m.State}>{m.State}</Label>
        {m.Autostart && <Label isCompact variant="outline">autostart</Label>}
        {m.Adopted && <Tooltip content="found live, defined nowhere"><Label isCompact variant="outline" tabIndex={0}>adopted</Label></Tooltip>}
        {m.InUse && <Tooltip content="a guest runs with it: Stop and Remove need force"><Label isCompact color="yellow" className="in-use" tabIndex={0}>in use</Label></Tooltip>}
    </>;
}

export function guestText(m) {
    return m.State === "defined" ? "not live" : `${(m.GuestApqns || []).length} of ${(m.Apqns || []).length} APQNs`;
}

/* Lost with the daemon's sentence; LostReasons' fixed word goes on each item for scripts. */
export function LostList({ m, limit }) {
    const lost = m.Lost || [];
    if (!lost.length) return null;
    const words = new Map((m.LostReasons || []).map(([a, d, w]) => [a * 65536 + d, w]));
    const shown = limit ? lost.slice(0, limit) : lost;
    return (
        <ul className="lost" aria-label="APQNs the guest does not get">
            {shown.map(([a, d, why]) => <li key={a * 65536 + d} data-reason={words.get(a * 65536 + d)}>{apqnName(a, d)}: {why}</li>)}
            {shown.length < lost.length && <li>… and {lost.length - shown.length} more (see Details)</li>}
        </ul>
    );
}

/* sysfsdev for QEMU, and libvirt's <hostdev> and node device XML as the daemon makes them
   (LibvirtXML, a read: asked when pressed). */
export function CopyButtons({ m }) {
    const { model } = usePage();
    const xml = (i) => () => model.call(m.path, MATRIX, "LibvirtXML", []).then((reply) => reply[i]);
    return (
        <span className="copies">
            <CopyButton text={m.SysfsPath} what={`the sysfsdev for QEMU's -device vfio-ap,sysfsdev= (${m.SysfsPath})`}>sysfsdev</CopyButton>
            <CopyButton get={xml(0)} what="libvirt's <hostdev> for the guest's domain XML" className="copy-hostdev">hostdev</CopyButton>
            <CopyButton get={xml(1)} what="the node device XML (virsh nodedev-define)" className="copy-nodedev">nodedev</CopyButton>
        </span>
    );
}
