/*
 * apmatrixd's Cockpit page. Talks to the daemon over the system D-Bus only
 * (org.apmatrix.Apmatrix1, see dbus/org.apmatrix.Apmatrix1.xml): the Manager proxy and the
 * Matrix and Adapter proxies, kept live by Cockpit's bridge from the ObjectManager signals
 * (InterfacesAdded/Removed) and PropertiesChanged. Nothing is polled; every change redraws.
 *
 * Plain JS, no build step. Ids are shown and typed in hexadecimal, as the kernel and lszcrypt
 * write them (APQN 05.0004 = adapter 0x05, domain 0x0004).
 */
(function () {
    "use strict";

    const NAME = "org.apmatrix.Apmatrix1";
    const ROOT = "/org/apmatrix/Apmatrix1";
    const MANAGER = NAME + ".Manager";
    const MATRIX = NAME + ".Matrix";
    const ADAPTER = NAME + ".Adapter";
    const ERR = NAME + ".Error.";

    /* The daemon's named errors, as a sentence an admin can act on; its message adds the detail
       (which APQNs, which owner, which errno). */
    const ERROR_TITLES = {
        Conflict: "Refused: these APQNs already belong to another matrix",
        HostOwned: "Refused: these APQNs are still in the host pool (reserve them first)",
        InvalidArgument: "Refused: invalid input",
        NotFound: "Not found (the matrix may have been removed meanwhile)",
        AlreadyExists: "Refused: that UUID or name is already taken",
        Busy: "Refused: a matrix still holds these APQNs",
        Kernel: "The kernel refused the change; nothing was changed",
        Failed: "apmatrixd failed unexpectedly (see its journal)",
    };
    const DBUS_TITLES = {
        "org.freedesktop.DBus.Error.AccessDenied":
            "Not permitted: changing AP matrices needs administrative access",
        "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired":
            "Administrative access is needed: turn it on in Cockpit's top bar",
        "org.freedesktop.DBus.Error.ServiceUnknown": "apmatrixd is not running",
        "org.freedesktop.DBus.Error.NameHasNoOwner": "apmatrixd is not running",
        "org.freedesktop.DBus.Error.NoReply": "apmatrixd did not answer",
        "org.freedesktop.DBus.Error.UnknownMethod": "apmatrixd does not offer this (too old?)",
    };

    const PALETTE = ["#2b9af3", "#f0ab00", "#4cb140", "#8f7bdf", "#ec7a08", "#009596",
        "#c46100", "#5752d1", "#7cc674", "#a2d9d9", "#b8bbbe", "#f4b678"];

    const $ = (id) => document.getElementById(id);

    function el(tag, props, ...children) {
        const node = document.createElement(tag);
        for (const [k, v] of Object.entries(props || {})) {
            if (v === undefined || v === null || v === false) continue;
            if (k === "class") node.className = v;
            else if (k === "text") node.textContent = v;
            else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
            else if (k === "dataset") Object.assign(node.dataset, v);
            else node.setAttribute(k, v === true ? "" : v);
        }
        for (const c of children) {
            if (c !== null && c !== undefined && c !== false)
                node.append(c instanceof Node ? c : String(c));
        }
        return node;
    }

    /* -- ids --------------------------------------------------------------------------------- */
    const hex2 = (n) => n.toString(16).padStart(2, "0");
    const apqnName = (a, d) => hex2(a) + "." + d.toString(16).padStart(4, "0");
    const key = (a, d) => a + "," + d;

    /* "05 06", "0x05,6", "04-07" -> sorted unique numbers; hexadecimal, as lszcrypt prints. */
    function parseIds(text, what) {
        const out = new Set();
        for (const tok of text.split(/[\s,;]+/).filter(Boolean)) {
            const m = /^(?:0x)?([0-9a-f]{1,8})(?:-(?:0x)?([0-9a-f]{1,8}))?$/i.exec(tok);
            if (!m) throw new Error(`${what}: "${tok}" is not a hexadecimal id (e.g. 05 or 04-07)`);
            const lo = parseInt(m[1], 16);
            const hi = m[2] === undefined ? lo : parseInt(m[2], 16);
            if (hi < lo || hi - lo > 255) throw new Error(`${what}: "${tok}" is not a range up to 256 ids`);
            for (let i = lo; i <= hi; i++) out.add(i);
        }
        return [...out].sort((x, y) => x - y);
    }

    /* [4, 5, 6, 0x47] -> "04-06 47" */
    function formatIds(ids) {
        const s = [...ids].sort((x, y) => x - y);
        const parts = [];
        for (let i = 0; i < s.length;) {
            let j = i;
            while (j + 1 < s.length && s[j + 1] === s[j] + 1) j++;
            parts.push(j - i >= 2 ? `${hex2(s[i])}-${hex2(s[j])}` : s.slice(i, j + 1).map(hex2).join(" "));
            i = j + 1;
        }
        return parts.join(" ") || "none";
    }

    /* -- errors and alerts ------------------------------------------------------------------- */
    function describe(err) {
        const name = (err && err.name) || "";
        let title = name.startsWith(ERR) ? ERROR_TITLES[name.slice(ERR.length)] : DBUS_TITLES[name];
        if (!title) title = name ? "Failed" : cockpit.message(err);
        let detail = (err && err.message) || "";
        if (detail === title) detail = "";
        return { title, detail, name };
    }

    function alert(kind, title, detail, name, sticky) {
        const box = $("alerts");
        const node = el("div", { class: `alert alert-${kind}`, role: kind === "danger" ? "alert" : "status", dataset: { errorName: name || "" } },
            el("div", { class: "alert-body" },
                el("strong", { class: "alert-title", text: title }),
                detail ? el("div", { class: "alert-detail", text: detail }) : null,
                name ? el("code", { class: "alert-name", text: name }) : null),
            el("button", { class: "alert-close", type: "button", "aria-label": "Dismiss", text: "×", onclick: () => node.remove() }));
        box.prepend(node);
        while (box.children.length > 5) box.lastElementChild.remove();
        if (!sticky && kind !== "danger") window.setTimeout(() => node.remove(), 6000);
        return node;
    }

    /* Run a D-Bus call for an action; a refusal becomes a readable alert. */
    function act(what, promise, success) {
        return promise.then((reply) => {
            if (success) alert("success", success);
            return reply;
        }, (err) => {
            const e = describe(err);
            alert("danger", `${what}: ${e.title}`, e.detail, e.name);
            return null;
        });
    }

    /* -- the bus ----------------------------------------------------------------------------- */
    const client = cockpit.dbus(NAME, { bus: "system", superuser: "try" });
    const manager = client.proxy(MANAGER, ROOT);
    const matrices = client.proxies(MATRIX, ROOT);
    const adapters = client.proxies(ADAPTER, ROOT);

    const call = (path, iface, method, args, type) =>
        client.call(path, iface, method, args, type ? { type } : undefined);

    /* The order apmatrixctl lists and letters matrices in: named ones first, by name, then
       the unnamed by UUID; compared by code point, as Python sorts, so both agree. */
    const cmp = (x, y) => (x < y ? -1 : x > y ? 1 : 0);
    const listing = (x, y) => cmp(x.Name === "" ? 1 : 0, y.Name === "" ? 1 : 0) || cmp(x.Name, y.Name) || cmp(x.Uuid, y.Uuid);

    function matrixList() {
        return Object.keys(matrices).map((p) => matrices[p])
            .filter((m) => m && m.valid && m.Uuid !== undefined)
            .sort(listing);
    }

    function adapterList() {
        return Object.keys(adapters).map((p) => adapters[p])
            .filter((a) => a && a.valid && a.Id !== undefined)
            .sort((x, y) => x.Id - y.Id);
    }

    /* Letters as apmatrixctl's pictures give them (listing order, A-Z a-z 0-9, then "*"), so
       one matrix has one letter everywhere; colours follow UUID order, so a matrix keeps its
       colour when others are renamed. */
    const LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    function colours(mats) {
        const map = new Map();
        const byUuid = [...mats].sort((x, y) => cmp(x.Uuid, y.Uuid)).map((m) => m.Uuid);
        [...mats].sort(listing).forEach((m, i) => map.set(m.Uuid, {
            colour: PALETTE[byUuid.indexOf(m.Uuid) % PALETTE.length],
            tag: i < LETTERS.length ? LETTERS[i] : "*",
        }));
        return map;
    }

    const label = (m) => m.Name || m.Uuid.slice(0, 8);

    /* -- what the Check of the form being edited says ---------------------------------------- */
    let preview = null; /* { proposed: Set(key), clashes: Map(key -> owner) } */

    function setPreview(p) {
        preview = p;
        scheduleRender();
    }

    /* -- rendering --------------------------------------------------------------------------- */
    let renderPending = false;
    function scheduleRender() {
        if (renderPending) return;
        renderPending = true;
        window.setTimeout(() => {
            renderPending = false;
            render();
        }, 0);
    }

    function render() {
        const mats = matrixList();
        const ads = adapterList();
        const cols = colours(mats);
        renderHost();
        renderGrid(mats, ads, cols);
        renderMatrices(mats, cols);
        renderAdapters(ads, mats);
    }

    function renderHost() {
        const info = $("host-info");
        if (!manager.valid) {
            info.textContent = "apmatrixd is not available";
            return;
        }
        info.replaceChildren(...[
            el("span", { text: `apmatrixd ${manager.Version}` }),
            el("span", { text: `${manager.Layout} layout` }),
            manager.KernelGeneration ? el("span", { id: "kernel-generation", text: `vfio_ap ${manager.KernelGeneration}` }) : null,
            el("span", { text: `adapters 00-${hex2(manager.MaxAdapterId)}, domains 00-${hex2(manager.MaxDomainId)}` }),
            manager.Settling ? el("span", { class: "badge badge-settling", id: "settling", text: "settling…" }) : null,
        ].filter(Boolean));
        $("pool-info").replaceChildren(
            el("div", {}, "Host keeps adapters ", el("code", { id: "pool-adapters-now", text: formatIds(manager.HostAdapters || []) })),
            el("div", {}, "× domains ", el("code", { id: "pool-domains-now", text: formatIds(manager.HostDomains || []) })));
    }

    function renderGrid(mats, ads, cols) {
        const byId = new Map(ads.map((a) => [a.Id, a]));
        const ownerOf = new Map();
        const guestSees = new Set();
        for (const m of mats) {
            for (const [a, d] of m.Apqns || []) ownerOf.set(key(a, d), m);
            for (const [a, d] of m.GuestApqns || []) guestSees.add(key(a, d));
        }

        const adapterIds = new Set(ads.map((a) => a.Id));
        const domainIds = new Set();
        for (const a of ads) for (const d of a.Domains || []) domainIds.add(d);
        for (const m of mats) {
            for (const a of m.Adapters || []) adapterIds.add(a);
            for (const d of m.Domains || []) domainIds.add(d);
        }
        if (preview) {
            for (const k of preview.proposed) {
                const [a, d] = k.split(",").map(Number);
                adapterIds.add(a);
                domainIds.add(d);
            }
        }
        const rows = [...adapterIds].sort((x, y) => x - y);
        const domains = [...domainIds].sort((x, y) => x - y);
        const hostA = new Set(manager.HostAdapters || []);
        const hostD = new Set(manager.HostDomains || []);

        const table = $("grid");
        $("grid-empty").hidden = rows.length > 0;
        const head = el("tr", {}, el("th", { class: "corner", text: "adapter \\ domain" }),
            ...domains.map((d) => el("th", { scope: "col", class: "dom", text: hex2(d) })));
        const body = rows.map((a) => {
            const ad = byId.get(a);
            const present = new Set(ad ? ad.Domains : []);
            const guest = new Set(ad ? ad.GuestDomains : []);
            const down = !ad || !ad.Online || !ad.Configured;
            const th = el("th", { scope: "row", class: "adapter" + (down ? " down" : ""), title: !ad ? "absent" : down ? (ad.Configured ? "offline" : "deconfigured") : "" },
                el("span", { class: "adapter-id", text: hex2(a) }),
                el("span", { class: "adapter-type", text: ad ? ad.Type : "absent" }));
            const cells = domains.map((d) => {
                const k = key(a, d);
                const m = ownerOf.get(k);
                const here = present.has(d);
                const inHost = here ? !guest.has(d) : hostA.has(a) && hostD.has(d);
                let cls, owner, title, text = "";
                if (m) {
                    /* A live matrix's APQN its guest does not get. Absent on the host (assigned
                       ahead, over-provisioned): drawn apart from one the guest had and lost
                       (adapter offline, deconfigured, queue taken); the reason is the daemon's. */
                    const notGiven = m.State !== "defined" && !guestSees.has(k);
                    owner = m.Uuid;
                    cls = "owned" + (notGiven ? (here ? " missing" : " ahead") : "");
                    text = cols.get(m.Uuid).tag;
                    title = `${label(m)} (${m.Uuid})`;
                    if (notGiven) {
                        const why = (m.Lost || []).find(([la, ld]) => la === a && ld === d);
                        title += ": " + (why ? why[2] : here ? "not seen by the guest" : "queue absent on the host");
                    }
                } else if (!here) {
                    cls = "absent";
                    owner = "absent";
                    title = "no such queue on this host";
                } else if (inHost) {
                    cls = "host";
                    owner = "host";
                    title = "host pool (the host's own crypto drivers)";
                } else {
                    cls = "free";
                    owner = "free";
                    title = "free: reserved for guests, in no matrix";
                }
                if (down && here && !m) cls += " down";
                if (preview && preview.proposed.has(k)) cls += " proposed";
                const clash = preview && preview.clashes.get(k);
                if (clash) {
                    cls += " clash";
                    title += clash === "host" ? "; CLASH: still in the host pool" : `; CLASH: held by ${ownerLabel(clash, mats)}`;
                }
                const td = el("td", { class: "cell " + cls, title: `${apqnName(a, d)}: ${title}`, dataset: { apqn: apqnName(a, d), owner } }, text);
                if (clash) td.dataset.clash = "true";
                if (m) td.style.setProperty("--owner", cols.get(m.Uuid).colour);
                return td;
            });
            return el("tr", {}, th, ...cells);
        });
        table.replaceChildren(el("thead", {}, head), el("tbody", {}, ...body));

        const legend = $("legend");
        legend.replaceChildren(
            el("li", {}, el("span", { class: "swatch host" }), "host pool"),
            el("li", {}, el("span", { class: "swatch free" }), "free (reserved)"),
            el("li", {}, el("span", { class: "swatch absent" }), "absent"),
            ...mats.map((m) => {
                const sw = el("span", { class: "swatch owned", text: cols.get(m.Uuid).tag });
                sw.style.setProperty("--owner", cols.get(m.Uuid).colour);
                return el("li", {}, sw, label(m));
            }),
            ...(table.querySelector("td.missing") ? [el("li", {}, el("span", { class: "swatch owned missing" }), "lost by its guest")] : []),
            ...(table.querySelector("td.ahead") ? [el("li", {}, el("span", { class: "swatch owned ahead" }), "assigned, not on this host")] : []),
            ...(preview && preview.clashes.size ? [el("li", {}, el("span", { class: "swatch clash" }), "clash")] : []));
    }

    function ownerLabel(owner, mats) {
        if (owner === "host") return "the host pool";
        const m = mats.find((x) => x.Uuid === owner);
        return m && m.Name ? `${m.Name} (${owner})` : owner;
    }

    /* Matrix rows persist (keyed by UUID) so that a half-typed assign is not wiped by a signal. */
    const rows = new Map();

    function renderMatrices(mats, cols) {
        const tbody = $("matrices").tBodies[0];
        $("matrices-empty").hidden = mats.length > 0;
        const seen = new Set();
        mats.forEach((m, i) => {
            seen.add(m.Uuid);
            let r = rows.get(m.Uuid);
            if (!r) {
                r = makeRow(m);
                rows.set(m.Uuid, r);
            }
            updateRow(r, m, cols.get(m.Uuid));
            if (tbody.children[i] !== r.tr) tbody.insertBefore(r.tr, tbody.children[i] || null);
        });
        for (const [uuid, r] of rows) {
            if (!seen.has(uuid)) {
                r.tr.remove();
                rows.delete(uuid);
            }
        }
    }

    function makeRow(m) {
        const r = { path: m.path, uuid: m.Uuid };
        r.name = el("td", { class: "name" });
        r.uuidCell = el("td", {}, el("code", { text: m.Uuid }));
        r.state = el("td", { class: "state" });
        r.adapters = el("td", { class: "ids" });
        r.domains = el("td", { class: "ids" });
        r.control = el("td", { class: "ids" });
        r.guest = el("td", { class: "guest" });
        r.sysfs = el("code", { class: "sysfs" });
        r.copy = el("button", { type: "button", class: "small copy", text: "Copy", title: "Copy for QEMU -device vfio-ap,sysfsdev=…", onclick: () => copyText(r.copy, Promise.resolve(r.sysfs.textContent)) });
        /* libvirt's two texts come from the daemon (Matrix.LibvirtXML), made from the sets it holds */
        r.hostdev = el("button", { type: "button", class: "small copy-hostdev", text: "<hostdev>", title: "Copy the <hostdev> element for the libvirt domain's <devices>", onclick: () => copyText(r.hostdev, libvirtXml(r, 0)) });
        r.nodedev = el("button", { type: "button", class: "small copy-nodedev", text: "nodedev", title: "Copy the node device XML for virsh nodedev-define", onclick: () => copyText(r.nodedev, libvirtXml(r, 1)) });
        r.start = el("button", { type: "button", class: "small", text: "Start", onclick: () => act(`Start ${r.label}`, call(r.path, MATRIX, "Start", [])) });
        r.stop = el("button", { type: "button", class: "small", text: "Stop", onclick: () => act(`Stop ${r.label}`, call(r.path, MATRIX, "Stop", [])) });
        r.remove = el("button", { type: "button", class: "small danger", text: "Remove", onclick: () => removeClicked(r) });
        r.kind = el("select", { class: "kind", "aria-label": "what to assign" },
            el("option", { value: "Adapter", text: "adapter" }),
            el("option", { value: "Domain", text: "domain" }),
            el("option", { value: "ControlDomain", text: "control domain" }));
        r.id = el("input", { class: "assign-id", size: "4", placeholder: "id", "aria-label": "id (hex)" });
        r.assign = el("button", { type: "button", class: "small", text: "Assign", onclick: () => assignClicked(r, "Assign") });
        r.unassign = el("button", { type: "button", class: "small", text: "Unassign", onclick: () => assignClicked(r, "Unassign") });
        r.id.addEventListener("input", () => assignPreview(r));
        r.kind.addEventListener("change", () => assignPreview(r));
        r.id.addEventListener("blur", () => window.setTimeout(() => { if (previewOwner === r) clearPreview(); }, 200));
        r.tr = el("tr", { dataset: { uuid: m.Uuid } },
            r.name, r.uuidCell, r.state, r.adapters, r.domains, r.control, r.guest,
            el("td", { class: "sysfs-cell" }, r.sysfs, r.copy, r.hostdev, r.nodedev),
            el("td", { class: "actions" },
                el("div", { class: "btns" }, r.start, r.stop, r.remove),
                el("div", { class: "assign" }, r.kind, r.id, r.assign, r.unassign)));
        return r;
    }

    function updateRow(r, m, col) {
        r.path = m.path;
        r.label = label(m);
        r.m = m;
        const sw = el("span", { class: "swatch owned", text: col.tag });
        sw.style.setProperty("--owner", col.colour);
        r.name.replaceChildren(sw, m.Name || el("span", { class: "muted", text: "(unnamed)" }));
        r.state.replaceChildren(...[
            el("span", { class: `badge state-${m.State}`, text: m.State }),
            m.Autostart ? el("span", { class: "badge", text: "autostart" }) : null,
            m.Adopted ? el("span", { class: "badge", text: "adopted", title: "found live at start-up" }) : null,
            m.InUse ? el("span", { class: "badge badge-in-use", text: "in use", title: "a guest runs with it: Stop and Remove need force" }) : null,
        ].filter(Boolean));
        r.state.dataset.state = m.State;
        r.adapters.textContent = formatIds(m.Adapters || []);
        r.domains.textContent = formatIds(m.Domains || []);
        r.control.textContent = formatIds(m.ControlDomains || []);
        const all = (m.Apqns || []).length;
        const seen = (m.GuestApqns || []).length;
        r.guest.replaceChildren(m.State === "defined" ? "not live" : `${seen} of ${all} APQNs`);
        r.guest.title = (m.GuestApqns || []).map(([a, d]) => apqnName(a, d)).join(" ");
        const lost = m.Lost || [];
        if (lost.length) {  /* why the guest lacks each APQN, as the daemon reads the host */
            r.guest.append(el("ul", { class: "lost" },
                ...lost.slice(0, 8).map(([a, d, why]) => el("li", { text: `${apqnName(a, d)}: ${why}` })),
                lost.length > 8 ? el("li", { text: `… and ${lost.length - 8} more` }) : null));
        }
        r.sysfs.textContent = m.SysfsPath;
        r.start.hidden = m.State !== "defined";
        r.stop.hidden = m.State === "defined";
    }

    function removeClicked(r) {
        if (r.remove.dataset.confirm !== "true") {
            r.remove.dataset.confirm = "true";
            r.remove.textContent = "Really remove?";
            window.setTimeout(() => {
                r.remove.dataset.confirm = "";
                r.remove.textContent = "Remove";
            }, 4000);
            return;
        }
        act(`Remove ${r.label}`, call(r.path, MATRIX, "Remove", []), `Removed ${r.label}`);
    }

    function assignClicked(r, verb) {
        let ids;
        try {
            ids = parseIds(r.id.value, r.kind.selectedOptions[0].textContent);
        } catch (e) {
            alert("danger", `${verb} on ${r.label}: ${e.message}`);
            return;
        }
        if (ids.length !== 1) {
            alert("danger", `${verb} on ${r.label}: give exactly one id`);
            return;
        }
        const method = verb + r.kind.value;
        act(`${verb} ${r.kind.selectedOptions[0].textContent} ${hex2(ids[0])} on ${r.label}`,
            call(r.path, MATRIX, method, [ids[0]], "u")).then((reply) => {
            if (reply) {
                r.id.value = "";
                clearPreview();
            }
        });
    }

    /* While an adapter or domain is typed into a row, Check what it would add. */
    let previewOwner = null;
    let checkSeq = 0;
    function clearPreview() {
        previewOwner = null;
        checkSeq++;
        setPreview(null);
    }

    function assignPreview(r) {
        const kind = r.kind.value;
        let ids;
        try {
            ids = parseIds(r.id.value, "id");
        } catch (e) {
            ids = [];
        }
        if (kind === "ControlDomain" || ids.length !== 1) {
            if (previewOwner === r) clearPreview();
            return;
        }
        const m = r.m;
        const ads = kind === "Adapter" ? [ids[0]] : m.Adapters;
        const doms = kind === "Domain" ? [ids[0]] : m.Domains;
        previewOwner = r;
        runCheck(ads, doms, m.Uuid, null);
    }

    /* Check(adapters, domains, uuid) and show the clashes on the grid (and in `out`). */
    function runCheck(ads, doms, uuid, out) {
        const seq = ++checkSeq;
        const proposed = new Set();
        for (const a of ads) for (const d of doms) proposed.add(key(a, d));
        if (!ads.length || !doms.length) {
            setPreview(null);
            if (out) setCheck(out, "", "");
            return;
        }
        return call(ROOT, MANAGER, "Check", [ads, doms, uuid], "auaus").then(([clashes]) => {
            if (seq !== checkSeq) return;
            const map = new Map(clashes.map(([a, d, owner]) => [key(a, d), owner]));
            setPreview({ proposed, clashes: map });
            if (!out) return;
            if (!clashes.length) {
                setCheck(out, "ok", `No clashes: all ${proposed.size} APQNs are free for this matrix.`, 0);
                return;
            }
            const mats = matrixList();
            const host = clashes.filter(([, , o]) => o === "host");
            const taken = clashes.filter(([, , o]) => o !== "host");
            const lines = [];
            if (taken.length)
                lines.push("Held by another matrix: " + taken.map(([a, d, o]) => `${apqnName(a, d)} (${ownerLabel(o, mats)})`).join(", "));
            if (host.length)
                lines.push("Still in the host pool, reserve first: " + host.map(([a, d]) => apqnName(a, d)).join(", "));
            setCheck(out, "clash", `${clashes.length} clash${clashes.length === 1 ? "" : "es"}. ` + lines.join(". "), clashes.length);
        }, (err) => {
            if (seq !== checkSeq) return;
            setPreview({ proposed, clashes: new Map() });
            const e = describe(err);
            if (out) setCheck(out, "error", `${e.title}${e.detail ? ": " + e.detail : ""}`, -1);
        });
    }

    function setCheck(out, kind, text, count) {
        out.className = "check-result" + (kind ? " check-" + kind : "");
        out.textContent = text;
        out.dataset.clashes = count === undefined ? "" : String(count);
    }

    /* -- create form ------------------------------------------------------------------------- */
    let createTimer = null;
    function createInputs() {
        return {
            adapters: parseIds($("create-adapters").value, "Adapters"),
            domains: parseIds($("create-domains").value, "Usage domains"),
            control: $("create-control").value.trim() ? parseIds($("create-control").value, "Control domains") : null,
        };
    }

    function createCheckSoon() {
        window.clearTimeout(createTimer);
        createTimer = window.setTimeout(createCheck, 150);
    }

    function createCheck() {
        const out = $("create-check");
        let v;
        try {
            v = createInputs();
        } catch (e) {
            setCheck(out, "error", e.message, -1);
            setPreview(null);
            return;
        }
        previewOwner = "create";
        runCheck(v.adapters, v.domains, "", out);
    }

    function createSubmit(ev) {
        ev.preventDefault();
        let v;
        try {
            v = createInputs();
        } catch (e) {
            alert("danger", `Create: ${e.message}`);
            return;
        }
        const name = $("create-name").value.trim();
        const options = {
            adapters: cockpit.variant("au", v.adapters),
            domains: cockpit.variant("au", v.domains),
            name: cockpit.variant("s", name),
            start: cockpit.variant("b", $("create-start").checked),
            autostart: cockpit.variant("b", $("create-autostart").checked),
        };
        if (v.control) options.control_domains = cockpit.variant("au", v.control);
        const what = name ? `Create ${name}` : "Create";
        const button = $("create-submit");
        button.disabled = true;
        act(what, call(ROOT, MANAGER, "CreateMatrix", [$("create-uuid").value.trim(), options], "sa{sv}"),
            `Created matrix ${name || ""}`.trim())
            .then((reply) => {
                button.disabled = false;
                if (!reply) return;
                $("create-form").reset();
                setCheck($("create-check"), "", "");
                clearPreview();
            });
    }

    /* -- host pool --------------------------------------------------------------------------- */
    function poolClicked(method) {
        let ads, doms;
        try {
            ads = parseIds($("pool-adapters").value, "Adapters");
            doms = parseIds($("pool-domains").value, "Domains");
        } catch (e) {
            alert("danger", `${method}: ${e.message}`);
            return;
        }
        const what = method === "Reserve" ? "Reserve" : "Release";
        act(what, call(ROOT, MANAGER, method, [ads, doms], "auau"),
            `${what}d adapters ${formatIds(ads)}, domains ${formatIds(doms)}`);
    }

    /* -- copy SysfsPath and libvirt's XML ---------------------------------------------------- */
    function legacyCopy(text) {
        const ta = el("textarea", { class: "offscreen", readonly: true });
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

    /* Copies what `text` (a promise) gives; the button says whether that worked. */
    function copyText(button, text) {
        const label = button.dataset.label || (button.dataset.label = button.textContent);
        const done = (ok) => {
            button.textContent = ok ? "Copied" : "Copy failed";
            button.dataset.copied = ok ? "true" : "false";
            window.setTimeout(() => {
                button.textContent = label;
                button.dataset.copied = "";
            }, 3000);
        };
        text.then((t) => {
            const viaApi = navigator.clipboard && window.isSecureContext
                ? navigator.clipboard.writeText(t)
                : Promise.reject(new Error("no clipboard API"));
            viaApi.then(() => done(true), () => done(legacyCopy(t)));
        }, () => done(false));
    }

    /* [hostdev, nodedev][which] of a matrix, as the daemon makes them; a refusal is an alert. */
    function libvirtXml(r, which) {
        return act(`Copy libvirt XML of ${r.label}`, call(r.path, MATRIX, "LibvirtXML", []))
            .then((reply) => (reply ? reply[which] : Promise.reject(new Error("no reply"))));
    }

    /* -- adapters table ---------------------------------------------------------------------- */
    function renderAdapters(ads, mats) {
        const tbody = $("adapters").tBodies[0];
        const yes = (b, cls) => el("span", { class: "badge " + (b ? "yes" : cls), text: b ? "yes" : "no" });
        tbody.replaceChildren(...ads.map((a) => {
            const held = new Set((a.Owners || []).map(([, uuid]) => uuid));
            return el("tr", { dataset: { adapter: hex2(a.Id) } },
                el("td", {}, el("code", { text: hex2(a.Id) })),
                el("td", { text: a.Type }),
                el("td", { text: a.Mode }),
                el("td", { class: "online" }, yes(a.Online, "no-warn")),
                el("td", { class: "configured" }, yes(a.Configured, "no-warn")),
                el("td", { class: "ids", text: formatIds(a.Domains || []) }),
                el("td", { class: "ids", text: formatIds(a.GuestDomains || []) }),
                el("td", { text: [...held].map((u) => {
                    const m = mats.find((x) => x.Uuid === u);
                    return m ? label(m) : u;
                }).join(", ") || "—" }));
        }));
    }

    /* -- start ------------------------------------------------------------------------------- */
    let daemonAlert = null;
    function daemonGone(text) {
        if (daemonAlert && daemonAlert.isConnected) return;
        daemonAlert = alert("danger", text, "Start it with: systemctl start apmatrixd", "", true);
        daemonAlert.id = "daemon-alert";
    }

    function start() {
        for (const p of [matrices, adapters]) {
            p.addEventListener("added", scheduleRender);
            p.addEventListener("changed", scheduleRender);
            p.addEventListener("removed", scheduleRender);
        }
        manager.addEventListener("changed", () => {
            scheduleRender();
            if (previewOwner === "create") createCheckSoon();
        });
        /* Another admin's change may create or settle a clash: keep the form's Check live. */
        for (const ev of ["added", "removed", "changed"])
            matrices.addEventListener(ev, () => { if (previewOwner === "create") createCheckSoon(); });

        client.subscribe({ path: ROOT, interface: MANAGER, member: "Drift" }, (path, iface, signal, args) => {
            const m = matrices[args[0]];
            alert("warning", `${m ? label(m) : args[0]} changed behind apmatrixd's back`, args[1]);
        });
        /* The daemon stopped: what is shown is stale. A new one started: its objects may
           differ in every way, so start afresh rather than patch up the proxies. */
        let owner = undefined;
        client.addEventListener("owner", (ev, now) => {
            if (now === null) {
                $("app").classList.add("stale");
                daemonGone("apmatrixd is not running");
            } else if (owner !== undefined && now !== owner) {
                window.location.reload();
            }
            owner = now;
        });
        client.addEventListener("close", (ev, options) => {
            alert("danger", "Lost the connection to the system bus", cockpit.message(options), options.problem, true);
        });

        for (const id of ["create-adapters", "create-domains"]) $(id).addEventListener("input", createCheckSoon);
        $("create-control").addEventListener("input", createCheckSoon);
        $("create-form").addEventListener("submit", createSubmit);
        $("create-form").addEventListener("reset", () => window.setTimeout(clearPreview, 0));
        $("pool-reserve").addEventListener("click", () => poolClicked("Reserve"));
        $("pool-release").addEventListener("click", () => poolClicked("Release"));

        Promise.all([manager.wait(), matrices.wait(), adapters.wait()].map((p) => Promise.resolve(p).catch(() => null)))
            .then(() => {
                if (!manager.valid) daemonGone("apmatrixd is not running");
                render();
                $("app").dataset.ready = "true";
            });
    }

    document.addEventListener("DOMContentLoaded", start);
}());
