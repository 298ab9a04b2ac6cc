#!/usr/bin/env node
/*
 * Builds the page from src/ into dist/ with esbuild, as Cockpit's starter kit builds its pages:
 * one bundle (index.js, index.css) holding React and the PatternFly parts it uses, so a host
 * needs no Node.js. dist/ is committed and shipped; tests/cockpit/test_build.py rebuilds it
 * and fails when it differs.
 *
 *   node build.js [--outdir DIR] [--node-modules DIR]
 *
 * --node-modules: where `npm ci` put the pinned packages (default ./node_modules); the test
 * and tools/build-cockpit keep them outside the checkout.
 */
import fs from "node:fs";
import path from "node:path";
import process from "node:process";
import zlib from "node:zlib";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
function option(name, fallback) {
    const i = args.indexOf(name);
    return i < 0 ? fallback : path.resolve(args[i + 1]);
}
const outdir = option("--outdir", path.join(here, "dist"));
const nodeModules = fs.realpathSync(option("--node-modules", path.join(here, "node_modules")));
const esbuild = (await import(createRequire(path.join(nodeModules, "x.js")).resolve("esbuild"))).default;

/* Cockpit serves the Red Hat fonts itself (/cockpit/static/fonts, src/fonts.css points there):
   PatternFly's own @font-face rules, which would need a copy of the fonts in the package,
   are left out. Its icon fonts and background images are never used (icons are SVG). */
const cockpitFonts = {
    name: "cockpit-fonts",
    setup(build) {
        build.onLoad({ filter: /@patternfly\/patternfly\/patternfly-base\.css$/ }, (a) => ({
            contents: fs.readFileSync(a.path, "utf8").replace(/@font-face\s*\{[^}]*RedHat[^}]*\}/g, ""),
            loader: "css",
        }));
        build.onResolve({ filter: /\.(woff2?|svg|ttf|eot)$/ }, (a) => ({ path: a.path, external: true }));
    },
};

fs.rmSync(outdir, { recursive: true, force: true });
const result = await esbuild.build({
    entryPoints: [path.join(here, "src", "index.jsx")],
    bundle: true,
    outdir,
    // Paths in the output's license notes are relative to this: the same wherever npm put them.
    absWorkingDir: path.dirname(nodeModules),
    nodePaths: [nodeModules],
    minify: true,
    legalComments: "external",
    target: ["es2020"],
    loader: { ".js": "jsx" },
    jsx: "automatic",
    define: { "process.env.NODE_ENV": '"production"' },
    metafile: true,
    logLevel: "warning",
    plugins: [cockpitFonts],
});
for (const f of ["index.html", "manifest.json"])
    fs.copyFileSync(path.join(here, "src", f), path.join(outdir, f));

/* Shipped compressed, as Cockpit's own pages are (the bridge serves index.js.gz for index.js):
   PatternFly's CSS alone is over a megabyte. */
for (const f of ["index.js", "index.css"]) {
    const file = path.join(outdir, f);
    fs.writeFileSync(file + ".gz", zlib.gzipSync(fs.readFileSync(file), { level: 9 }));
    fs.unlinkSync(file);
}

/* What is bundled, at which version (the pinned lock), for the packages' copyright notes. */
const lock = JSON.parse(fs.readFileSync(path.join(here, "package-lock.json"), "utf8"));
const bundled = new Set();
for (const input of Object.keys(result.metafile.inputs)) {
    const m = /node_modules\/(@[^/]+\/[^/]+|[^/]+)\//.exec(input);
    if (m) bundled.add(m[1]);
}
const lines = [...bundled].sort().map((name) => {
    const p = lock.packages[`node_modules/${name}`];
    return `${name} ${p.version} ${p.license}`;
});
fs.writeFileSync(path.join(outdir, "bundled-modules.txt"), lines.join("\n") + "\n");
