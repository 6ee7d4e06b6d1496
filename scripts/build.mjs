// The production build: the service and every dependency it imports, bundled by esbuild into one
// ES module, dist/server.js, with a linked source map. Type checking is `npm run typecheck`.
//
// Why a bundle: start-up was spent loading modules, not starting the service. typebox alone is
// about 700 files, and Node resolved, read, compiled and linked about 1,400 files before the first
// request (1.4 s to ready on the benchmark machine; about 0.8 s as one file). The image then needs
// no node_modules at all.
//
// No keepNames: it wraps every named function in a call to esbuild's __name(), which defines its
// name property with Object.defineProperty. Inner functions are named on every call of the
// function around them (Fastify's hook runners, undici's writers, pino's redaction), which cost
// a cancel about a third of its CPU in the bundle (287 against 463 µs per request side by side,
// `BENCH_VARIANTS`). Without it esbuild keeps every name but those it must rename on a clash
// (`Redis2`), which only logs and debug output show; every plugin we register and every plugin
// we depend on is named through fastify-plugin's metadata, not its function's name.
import { rmSync } from 'node:fs'
import { build } from 'esbuild'

// BUILD_OUTDIR: a second build beside dist/, for side-by-side benchmarks (BENCH_VARIANTS).
const outdir = process.env.BUILD_OUTDIR ?? 'dist'
rmSync(outdir, { recursive: true, force: true })
await build({
  entryPoints: ['src/server.ts'],
  outfile: `${outdir}/server.js`,
  bundle: true,
  platform: 'node',
  format: 'esm',
  // The oldest Node the service runs on (this machine's); the image runs Node 24.
  target: 'node20',
  sourcemap: 'linked',
  // CommonJS dependencies (fastify, pino, ioredis, ...) call require() for Node's built-ins,
  // which an ES module does not have.
  banner: { js: "import { createRequire as bffCreateRequire } from 'node:module'; const require = bffCreateRequire(import.meta.url);" },
  // `debug` (ioredis's) loads supports-color if it can, in a try: no dependency of ours, it is
  // here only through the dev tree (tap, autocannon), so the bundle would change with whether dev
  // dependencies were installed. Left out, the require fails in its try and debug goes colourless.
  external: ['supports-color'],
  logLevel: 'warning'
})
