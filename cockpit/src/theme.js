/*
 * Follow Cockpit's light/dark theme as its own pages do: the shell's choice is
 * localStorage["shell:style"] ("auto", "light", "dark"; another frame changing it fires
 * "storage"; the shell tells its own frames with a "cockpit-style" event), and "auto" follows
 * the browser's prefers-color-scheme. PatternFly 6 switches on the pf-v6-theme-dark class.
 */
const DARK = "pf-v6-theme-dark";
const query = window.matchMedia ? window.matchMedia("(prefers-color-scheme: dark)") : null;

function apply(style) {
    let chosen = style;
    if (!chosen) {
        try {
            chosen = window.localStorage.getItem("shell:style");
        } catch (e) { /* storage may be off: then "auto" */ }
    }
    chosen = chosen || "auto";
    const dark = chosen === "dark" || (chosen === "auto" && query !== null && query.matches);
    document.documentElement.classList.toggle(DARK, dark);
}

window.addEventListener("storage", (ev) => { if (ev.key === "shell:style") apply(); });
window.addEventListener("cockpit-style", (ev) => apply(ev.detail && ev.detail.style));
if (query) query.addEventListener("change", () => apply());
apply();
