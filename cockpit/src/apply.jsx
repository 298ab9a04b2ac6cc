/*
 * "Apply a layout": the declared state (Manager.Apply). A YAML document is pasted or read from
 * a file; a dry run (check) shows the daemon's plan, step by step, and only that plan, for
 * that very document and prune choice, can then be applied. Apply needs administrative access
 * even for its dry run (polkit org.apmatrix.apmatrix1.apply), so without it the dialog is
 * not offered.
 */
import React, { useRef, useState } from "react";
import { Alert } from "@patternfly/react-core/dist/esm/components/Alert/index.js";
import { Button } from "@patternfly/react-core/dist/esm/components/Button/index.js";
import { Checkbox } from "@patternfly/react-core/dist/esm/components/Checkbox/index.js";
import { Form, FormGroup } from "@patternfly/react-core/dist/esm/components/Form/index.js";
import { Modal, ModalBody, ModalFooter, ModalHeader } from "@patternfly/react-core/dist/esm/components/Modal/index.js";
import { TextArea } from "@patternfly/react-core/dist/esm/components/TextArea/index.js";
import { Table, Tbody, Td, Th, Thead, Tr } from "@patternfly/react-table/dist/esm/components/Table/index.js";

import cockpit from "./cockpit.js";
import { usePage } from "./actions.js";
import { describe } from "./errors.js";
import { MANAGER, ROOT, unvariant } from "./model.js";
import { ChangeButton } from "./widgets.jsx";

const EXAMPLE = `reserve: {adapters: ["05", "06"], domains: ["04", "47"]}
matrices:
  - name: guest1
    adapters: ["05", "06"]
    domains: ["04"]
    autostart: true`;

function Plan({ result }) {
    if (!result.changed) return <p id="apply-nothing">Nothing to change: the host already has this layout.</p>;
    return (
        <Table id="apply-plan" aria-label="What Apply will do, in order" variant="compact">
            <Thead><Tr><Th>Step</Th><Th>Action</Th><Th>Target</Th><Th>What</Th></Tr></Thead>
            <Tbody>
                {result.plan.map((step, i) => (
                    <Tr key={i} data-action={step.action} data-target={step.target}>
                        <Td>{i + 1}</Td><Td className="action">{step.action}</Td><Td className="target">{step.target}</Td>
                        <Td className="text">{step.text}</Td>
                    </Tr>))}
            </Tbody>
        </Table>
    );
}

function ApplyDialog({ onClose }) {
    const { model, addAlert } = usePage();
    const [doc, setDoc] = useState("");
    const [prune, setPrune] = useState(false);
    const [planned, setPlanned] = useState(null); /* { doc, prune, result } of the last dry run */
    const [error, setError] = useState(null);
    const [busy, setBusy] = useState(false);
    const file = useRef(null);

    const call = (check) => model.call(ROOT, MANAGER, "Apply",
        [doc, { check: cockpit.variant("b", check), prune: cockpit.variant("b", prune) }], "sa{sv}")
        .then(([r]) => {
            const result = unvariant(r);
            return { changed: !!result.changed, plan: (result.plan || []).map(unvariant) };
        });
    const run = (check) => {
        setBusy(true);
        setError(null);
        call(check).then((result) => {
            setBusy(false);
            if (check) {
                setPlanned({ doc, prune, result });
            } else {
                addAlert({ variant: "success", title: `Applied the layout: ${result.plan.length} step${result.plan.length === 1 ? "" : "s"}` });
                onClose();
            }
        }, (err) => {
            setBusy(false);
            setPlanned(null);
            setError(describe(err));
        });
    };
    const upload = (ev) => {
        const f = ev.target.files && ev.target.files[0];
        if (f) f.text().then((t) => { setDoc(t); setPlanned(null) }, (e) => setError({ title: `Cannot read ${f.name}`, detail: String(e) }));
        ev.target.value = "";
    };
    const current = planned && planned.doc === doc && planned.prune === prune;
    const why = !doc.trim() ? "paste or upload a layout first"
        : !current ? "do a dry run first: the plan is shown before anything is applied"
            : !planned.result.changed ? "nothing to change" : "";
    return (
        <Modal id="apply-dialog" isOpen variant="large" onClose={onClose} aria-labelledby="apply-title">
            <ModalHeader title="Apply a layout" labelId="apply-title"
                         description="The declared state of the host: its reservations and apmatrixd's matrices, as apmatrixctl apply takes it. All or nothing; mdevctl's and external matrices are never touched." />
            <ModalBody>
                <Form onSubmit={(ev) => ev.preventDefault()}>
                    <FormGroup label="Layout (YAML)" fieldId="apply-document">
                        <TextArea id="apply-document" value={doc} resizeOrientation="vertical" rows={10} placeholder={EXAMPLE}
                                  onChange={(ev, x) => setDoc(x)} className="apply-document" spellCheck={false} />
                        <input type="file" ref={file} className="offscreen" accept=".yaml,.yml,.json,text/yaml,application/json"
                               onChange={upload} tabIndex={-1} aria-hidden="true" aria-label="Layout file" />
                        <Button variant="link" isInline id="apply-upload" onClick={() => file.current.click()}>Upload a file…</Button>
                    </FormGroup>
                    <Checkbox id="apply-prune" isChecked={prune} onChange={(ev, x) => setPrune(x)}
                              label="Prune: also remove apmatrixd's matrices the layout lacks and give back to the host what it does not reserve" />
                </Form>
                {error &&
                    <Alert id="apply-error" isInline variant="danger" title={error.title} data-error-name={error.name || ""}>
                        {error.detail}
                    </Alert>}
                {current && <div id="apply-result"><Plan result={planned.result} /></div>}
            </ModalBody>
            <ModalFooter>
                <ChangeButton id="apply-check" variant={current ? "secondary" : "primary"} isLoading={busy}
                              reason={!doc.trim() ? "paste or upload a layout first" : busy ? "asking apmatrixd…" : ""}
                              onClick={() => run(true)}>Dry run</ChangeButton>
                <ChangeButton id="apply-submit" variant={current ? "primary" : "secondary"} reason={busy ? "asking apmatrixd…" : why}
                              onClick={() => run(false)}>Apply</ChangeButton>
                <Button id="apply-cancel" variant="link" onClick={onClose}>Cancel</Button>
            </ModalFooter>
        </Modal>
    );
}

export function ApplyButton() {
    const [open, setOpen] = useState(false);
    return <>
        <ChangeButton id="apply-open" variant="secondary" onClick={() => setOpen(true)}>Apply a layout…</ChangeButton>
        {open && <ApplyDialog onClose={() => setOpen(false)} />}
    </>;
}
