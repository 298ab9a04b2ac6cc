/*
 * The page's one view of apmatrixd: the Manager, Matrix and Adapter proxies on the system bus,
 * kept live by Cockpit's bridge from the ObjectManager signals and PropertiesChanged (nothing
 * is polled). Each object is held as a plain snapshot that is replaced, never changed, when its
 * proxy changes, so React redraws only what changed; listeners hear about a burst of changes
 * once. Also the superuser state (Cockpit's "Administrative access") and the render timings
 * the browser test reads (window.apmatrixPerf).
 */
import cockpit from "./cockpit.js";
import { NAME } from "./errors.js";

export const ROOT = "/org/apmatrix/Apmatrix1";
export const MANAGER = NAME + ".Manager";
export const MATRIX = NAME + ".Matrix";
export const ADAPTER = NAME + ".Adapter";

const snap = (proxy) => ({ path: proxy.path, ...proxy.data });

/* The order apmatrixctl lists and letters matrices in: named ones first, by name, then the
   unnamed by UUID; compared by code point, as Python sorts, so both agree. */
const cmp = (x, y) => (x < y ? -1 : x > y ? 1 : 0);
export const listing = (x, y) =>
    cmp(x.Name === "" ? 1 : 0, y.Name === "" ? 1 : 0) || cmp(x.Name, y.Name) || cmp(x.Uuid, y.Uuid);

/* One letter per matrix as apmatrixctl's pictures give them (listing order, A-Z a-z 0-9,
   then "*"); colours follow UUID order, so a matrix keeps its colour when others are renamed. */
const LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const PALETTE = ["#2b9af3", "#f0ab00", "#4cb140", "#8f7bdf", "#ec7a08", "#009596",
    "#c46100", "#5752d1", "#7cc674", "#a2d9d9", "#b8bbbe", "#f4b678"];

export const label = (m) => m.Name || m.Uuid.slice(0, 8);

/* An a{sv} value as the bridge gives it ({t, v} per variant), as plain values. */
export const unvariant = (x) => (x && typeof x === "object" && "t" in x && "v" in x ? unvariant(x.v)
    : x && typeof x === "object" && !Array.isArray(x) ? Object.fromEntries(Object.entries(x).map(([k, v]) => [k, unvariant(v)]))
        : x);

/* Who manages a matrix (its Manager property): apmatrixd changes only its own, the daemon
   answers NotManaged for the others until TakeOver; so the page offers no change of theirs. */
export const MANAGERS = {
    apmatrixd: { name: "apmatrixd", short: "apmatrixd" },
    mdevctl: { name: "mdevctl", short: "mdevctl", text: "its definition is mdevctl's (/etc/mdevctl.d)" },
    external: { name: "another tool", short: "external", text: "made outside apmatrixd: a live mdev nobody defined (KubeVirt, a CEX DRA driver, a shell)" },
};
export const managerOf = (m) => m.Manager || "apmatrixd";
export function notManaged(m) {
    const who = managerOf(m);
    if (who === "apmatrixd") return "";
    const how = who === "mdevctl" ? "change it with mdevctl, or " : "";
    return `Managed by ${MANAGERS[who] ? MANAGERS[who].name : who}: apmatrixd changes only its own matrices; ${how}Take over to change it here.`;
}

export class Apmatrix {
    constructor() {
        this.client = cockpit.dbus(NAME, { bus: "system", superuser: "try" });
        this.managerProxy = this.client.proxy(MANAGER, ROOT);
        this.matrixProxies = this.client.proxies(MATRIX, ROOT);
        this.adapterProxies = this.client.proxies(ADAPTER, ROOT);
        this.state = {
            ready: false, stale: false, manager: null, matrices: new Map(), adapters: new Map(),
            admin: null, version: 0,
        };
        this.derivedFor = -1;
        this.listeners = new Set();
        this.pending = false;
        this.perf = { loaded: null, first: null, updates: [], since: null };
        window.apmatrixPerf = this.perf;
    }

    subscribe = (fn) => {
        this.listeners.add(fn);
        return () => this.listeners.delete(fn);
    };

    getState = () => this.state;

    /* Coalesce a burst of proxy events into one new state and one notification. */
    touch(change) {
        if (this.perf.since === null) this.perf.since = performance.now();
        const s = this.state;
        const next = { ...s, version: s.version + 1 };
        change(next);
        this.state = next;
        if (this.pending) return;
        this.pending = true;
        queueMicrotask(() => {
            this.pending = false;
            for (const fn of this.listeners) fn();
        });
    }

    start() {
        const watch = (proxies, field) => {
            const put = (ev, proxy) => {
                if (!proxy || proxy.data === undefined) return;
                this.touch((n) => {
                    n[field] = new Map(n[field]);
                    n[field].set(proxy.path, snap(proxy));
                });
            };
            proxies.addEventListener("added", put);
            proxies.addEventListener("changed", put);
            proxies.addEventListener("removed", (ev, proxy) => this.touch((n) => {
                n[field] = new Map(n[field]);
                n[field].delete(proxy.path);
            }));
        };
        watch(this.matrixProxies, "matrices");
        watch(this.adapterProxies, "adapters");
        this.managerProxy.addEventListener("changed", () => this.touch((n) => {
            n.manager = this.managerProxy.valid ? snap(this.managerProxy) : null;
        }));

        /* Cockpit's "Administrative access": without it a change would be refused, so the page
           offers none (cockpit.permission reloads the page when it is switched). */
        const permission = cockpit.permission({ admin: true });
        const admin = () => this.touch((n) => { n.admin = permission.allowed });
        permission.addEventListener("changed", admin);
        admin();

        /* The daemon stopped: what is shown is stale. A new one started: its objects may differ
           in every way, so start afresh rather than patch up the proxies. */
        let owner;
        this.client.addEventListener("owner", (ev, now) => {
            if (now === null) this.touch((n) => { n.stale = true });
            else if (owner !== undefined && now !== owner) window.location.reload();
            owner = now;
        });

        const settle = (p) => Promise.resolve(p).catch(() => null);
        Promise.all([this.managerProxy.wait(), this.matrixProxies.wait(), this.adapterProxies.wait()].map(settle))
            .then(() => {
                this.perf.loaded = performance.now();
                this.perf.since = this.perf.loaded;
                this.touch((n) => {
                    n.ready = true;
                    n.stale = !this.managerProxy.valid;
                    n.manager = this.managerProxy.valid ? snap(this.managerProxy) : null;
                    n.matrices = new Map(Object.values(this.matrixProxies)
                        .filter((p) => p && p.valid && p.data && p.data.Uuid !== undefined)
                        .map((p) => [p.path, snap(p)]));
                    n.adapters = new Map(Object.values(this.adapterProxies)
                        .filter((p) => p && p.valid && p.data && p.data.Id !== undefined)
                        .map((p) => [p.path, snap(p)]));
                });
            });
    }

    /* What every part of the page draws from, computed once per state. */
    derived() {
        const s = this.state;
        if (this.derivedFor === s.version) return this.derivedCache;
        const prev = this.derivedFor >= 0 ? this.derivedCache : null;
        const sameMatrices = prev && prev.state.matrices === s.matrices;
        const sameAdapters = prev && prev.state.adapters === s.adapters;
        let matrices, tags, byUuid;
        if (sameMatrices) {
            ({ matrices, tags, byUuid } = prev);
        } else {
            matrices = [...s.matrices.values()].filter((m) => m.Uuid !== undefined).sort(listing);
            byUuid = new Map(matrices.map((m) => [m.Uuid, m]));
            const uuids = matrices.map((m) => m.Uuid).sort(cmp);
            const rank = new Map(uuids.map((u, i) => [u, i]));
            /* The same tag object while a matrix's letter and colour stay, so that its row
               and cells are not drawn again when another matrix changes. */
            tags = new Map(matrices.map((m, i) => {
                const colour = PALETTE[rank.get(m.Uuid) % PALETTE.length];
                const tag = i < LETTERS.length ? LETTERS[i] : "*";
                const old = prev && prev.tags.get(m.Uuid);
                return [m.Uuid, old && old.colour === colour && old.tag === tag ? old : { colour, tag }];
            }));
        }
        const adapters = sameAdapters
            ? prev.adapters
            : [...s.adapters.values()].filter((a) => a.Id !== undefined).sort((x, y) => x.Id - y.Id);
        this.derivedCache = { state: s, matrices, tags, byUuid, adapters };
        this.derivedFor = s.version;
        return this.derivedCache;
    }

    /* Called by the page once the DOM holds a state: the time since the first change it
       holds arrived, to the DOM and to the next frame. */
    rendered(version) {
        if (!this.state.ready || this.perf.since === null || version !== this.state.version) return;
        const since = this.perf.since;
        this.perf.since = null;
        const entry = { dom: performance.now() - since, painted: null, version };
        if (this.perf.first === null) this.perf.first = entry;
        else this.perf.updates.push(entry);
        requestAnimationFrame(() => setTimeout(() => { entry.painted = performance.now() - since }, 0));
    }

    call(path, iface, method, args, type) {
        return this.client.call(path, iface, method, args, type ? { type } : undefined);
    }

    /* Manager.Statistics sends no PropertiesChanged: read when wanted (the page asks at
       start, after a Drift and when its popover opens). */
    statistics() {
        return this.client.call(ROOT, "org.freedesktop.DBus.Properties", "Get", [MANAGER, "Statistics"], { type: "ss" })
            .then(([v]) => unvariant(v));
    }

    subscribeDrift(fn) {
        return this.client.subscribe({ path: ROOT, interface: MANAGER, member: "Drift" },
            (path, iface, signal, args) => fn(args[0], args[1]));
    }

    onClose(fn) {
        this.client.addEventListener("close", (ev, options) => fn(options));
    }
}
