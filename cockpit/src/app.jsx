/* The page: the host line, the alerts, the APQN grid, the create and host pool forms, the
   matrices and the adapters; a matrix's detail opens in a drawer at the side. */
import React, { useCallback, useEffect, useLayoutEffect, useMemo, useReducer, useRef, useState, useSyncExternalStore } from "react";
import { Alert, AlertActionCloseButton, AlertGroup } from "@patternfly/react-core/dist/esm/components/Alert/index.js";
import { Drawer, DrawerContent, DrawerContentBody } from "@patternfly/react-core/dist/esm/components/Drawer/index.js";
import { Label, LabelGroup } from "@patternfly/react-core/dist/esm/components/Label/index.js";
import { Page, PageSection } from "@patternfly/react-core/dist/esm/components/Page/index.js";
import { Title } from "@patternfly/react-core/dist/esm/components/Title/index.js";
import { Tooltip } from "@patternfly/react-core/dist/esm/components/Tooltip/index.js";
import { Flex, FlexItem } from "@patternfly/react-core/dist/esm/layouts/Flex/index.js";
import { Grid, GridItem } from "@patternfly/react-core/dist/esm/layouts/Grid/index.js";

import cockpit from "./cockpit.js";
import { ADMIN_OFF, PageContext, alertId, alertsReducer, makeAct } from "./actions.js";
import { AdaptersCard } from "./adapters.jsx";
import { describe } from "./errors.js";
import { CreateCard, PoolCard } from "./forms.jsx";
import { GridCard } from "./grid.jsx";
import { hex2, key } from "./ids.js";
import { MatrixDetail } from "./detail.jsx";
import { MatricesCard } from "./matrices.jsx";
import { MANAGER, ROOT, label } from "./model.js";
import { Statistics } from "./statistics.jsx";

function HostInfo({ manager, statistics, refresh }) {
    if (!manager) return <span id="host-info">apmatrixd is not available</span>;
    const features = manager.KernelFeatures || [];
    return (
        <LabelGroup id="host-info" numLabels={8} aria-label="The host">
            <Label isCompact>apmatrixd {manager.Version}</Label>
            <Label isCompact>{manager.Layout} layout</Label>
            {manager.KernelGeneration &&
                <Tooltip content={features.length ? "Found in sysfs: " + features.join(", ") : "told from sysfs"}>
                    <Label isCompact color="blue" id="kernel-generation" tabIndex={0}>vfio_ap {manager.KernelGeneration}</Label>
                </Tooltip>}
            <Label isCompact>adapters 00-{hex2(manager.MaxAdapterId)}, domains 00-{hex2(manager.MaxDomainId)}</Label>
            <Statistics statistics={statistics} refresh={refresh} />
            {manager.Settling && <Label isCompact color="orange" id="settling">settling…</Label>}
            {manager.Pending && <Label isCompact color="orange" id="pending">waiting on the kernel: {manager.Pending}</Label>}
        </LabelGroup>
    );
}

function Alerts({ alerts, remove }) {
    return (
        <AlertGroup id="alerts" isLiveRegion aria-label="Messages">
            {alerts.map((a) => (
                <Alert key={a.id} id={a.domId} isInline variant={a.variant} title={a.title}
                       data-error-name={a.name || ""} className="alert"
                       actionClose={<AlertActionCloseButton onClose={() => remove(a.id)} />}>
                    {a.detail && <div className="alert-detail">{a.detail}</div>}
                    {a.name && <code className="alert-name">{a.name}</code>}
                </Alert>))}
        </AlertGroup>
    );
}

/* Check(adapters, domains, uuid) for whichever form is being edited; the last one asked wins. */
function useCheck(model) {
    const [preview, setPreview] = useState(null);
    const seq = useRef(0);
    const check = useCallback((owner, ads, doms, uuid) => {
        const mine = ++seq.current;
        if (!ads.length || !doms.length) {
            setPreview(null);
            return Promise.resolve(null);
        }
        const proposed = new Set();
        for (const a of ads) for (const d of doms) proposed.add(key(a, d));
        return model.call(ROOT, MANAGER, "Check", [ads, doms, uuid], "auaus").then(([clashes]) => {
            if (mine !== seq.current) return undefined;
            setPreview({ owner, proposed, clashes: new Map(clashes.map(([a, d, o]) => [key(a, d), o])) });
            return { clashes, size: proposed.size };
        }, (err) => {
            if (mine !== seq.current) return undefined;
            setPreview({ owner, proposed, clashes: new Map() });
            return { error: describe(err) };
        });
    }, [model]);
    const clear = useCallback((owner) => {
        seq.current++;
        setPreview((p) => (owner === undefined || (p && p.owner === owner) ? null : p));
    }, []);
    return { preview, check, clear };
}

export function Application({ model }) {
    const state = useSyncExternalStore(model.subscribe, model.getState);
    const d = model.derived();
    const [alerts, dispatch] = useReducer(alertsReducer, []);
    const [selected, setSelected] = useState(null);
    const { preview, check, clear } = useCheck(model);
    const [statistics, setStatistics] = useState(null);
    const refreshStatistics = useCallback(() => model.statistics().then(setStatistics, () => setStatistics(null)), [model]);

    const addAlert = useCallback((alert) => {
        const id = alertId();
        dispatch({ type: "add", alert: { id, ...alert } });
        if (!alert.sticky && alert.variant !== "danger")
            window.setTimeout(() => dispatch({ type: "remove", id }), 6000);
    }, []);
    const removeAlert = useCallback((id) => dispatch({ type: "remove", id }), []);
    const act = useMemo(() => makeAct(addAlert), [addAlert]);

    useEffect(() => {
        model.subscribeDrift((path, what) => {
            refreshStatistics();
            const m = model.getState().matrices.get(path);
            addAlert({ variant: "warning", title: `${m ? label(m) : path} changed behind apmatrixd's back`, detail: what });
        });
        model.onClose((options) => addAlert({
            variant: "danger", title: "Lost the connection to the system bus",
            detail: cockpit.message(options), name: options.problem, sticky: true,
        }));
    }, [model, addAlert, refreshStatistics]);
    /* Statistics again whenever a new daemon's Manager appears (at load, after a restart). */
    const daemonUp = state.ready && !!state.manager;
    useEffect(() => { if (daemonUp) refreshStatistics() }, [daemonUp, refreshStatistics]);

    useLayoutEffect(() => {
        const app = document.getElementById("app");
        app.classList.toggle("stale", state.stale);
        if (state.ready) app.dataset.ready = "true";
        model.rendered(state.version);
    });

    const admin = state.admin === true;
    const ctx = useMemo(() => ({
        model, act, addAlert, admin, adminReason: admin ? "" : ADMIN_OFF, check, clear, preview,
        select: setSelected, selected, byUuid: () => model.derived().byUuid,
    }), [model, act, addAlert, admin, check, clear, preview, selected]);

    const detail = selected && d.byUuid.get(selected);
    const gone = state.ready && state.stale;
    return (
        <PageContext.Provider value={ctx}>
            <Page className="apmatrix-page pf-m-no-sidebar" isContentFilled>
                <Drawer isExpanded={!!detail} isInline position="end">
                    <DrawerContent panelContent={detail
                        ? <MatrixDetail m={detail} tag={d.tags.get(detail.Uuid)} adapters={d.adapters} onClose={() => setSelected(null)} />
                        : null}>
                        <DrawerContentBody>
                            <PageSection hasBodyWrapper={false} className="apmatrix-top">
                                <Flex alignItems={{ default: "alignItemsCenter" }} spaceItems={{ default: "spaceItemsLg" }}>
                                    <FlexItem><Title headingLevel="h1" size="2xl">AP crypto matrices</Title></FlexItem>
                                    <FlexItem>{state.ready ? <HostInfo manager={state.manager} statistics={statistics} refresh={refreshStatistics} /> : <span id="host-info">connecting to apmatrixd…</span>}</FlexItem>
                                </Flex>
                            </PageSection>
                            <PageSection hasBodyWrapper={false} className="apmatrix-body">
                                {state.admin === false &&
                                    <Alert id="admin-alert" isInline variant="info" title="Read only: administrative access is off">
                                        <span id="admin-reason">{ADMIN_OFF} Reading and Check need no administrative access.</span>
                                    </Alert>}
                                {gone &&
                                    <Alert id="daemon-alert" isInline variant="danger" title="apmatrixd is not running">
                                        Start it with: systemctl start apmatrixd
                                    </Alert>}
                                <Alerts alerts={alerts} remove={removeAlert} />
                                <Grid hasGutter className={gone ? "stale-content" : ""}>
                                    <GridItem span={12}>
                                        <GridCard d={d} />
                                    </GridItem>
                                    <GridItem lg={7} span={12}><CreateCard version={preview && preview.owner === "create" ? state.version : 0} /></GridItem>
                                    <GridItem lg={5} span={12}><PoolCard manager={state.manager} /></GridItem>
                                    <GridItem span={12}><MatricesCard d={d} /></GridItem>
                                    <GridItem span={12}><AdaptersCard d={d} /></GridItem>
                                </Grid>
                            </PageSection>
                        </DrawerContentBody>
                    </DrawerContent>
                </Drawer>
            </Page>
        </PageContext.Provider>
    );
}
