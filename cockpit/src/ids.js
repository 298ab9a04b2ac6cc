/* Ids as the kernel and lszcrypt write them: hexadecimal, APQN 05.0004 = adapter 0x05,
   domain 0x0004. */
export const hex2 = (n) => n.toString(16).padStart(2, "0");
export const apqnName = (a, d) => hex2(a) + "." + d.toString(16).padStart(4, "0");
export const key = (a, d) => a * 65536 + d;
export const unkey = (k) => [Math.floor(k / 65536), k % 65536];

/* "05 06", "0x05,6", "04-07" -> sorted unique numbers; hexadecimal, as lszcrypt prints. */
export function parseIds(text, what) {
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
export function formatIds(ids) {
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
