import t, { type Test } from 'tap'
import { spawn, spawnSync } from 'node:child_process'
import { once } from 'node:events'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Readable } from 'node:stream'
import { setTimeout as sleep } from 'node:timers/promises'
import { freePort } from './helpers/ports.js'

/**
 * The image runs `node dist/server.js` as PID 1, with no init (Dockerfile, CMD). The kernel
 * delivers to PID 1 only the signals it has a handler for: a SIGTERM that comes before the
 * process has one (`docker stop` or a pod deleted while the replica starts) is dropped, not acted
 * on by Node's default disposition as in any other process. Reproduced without Docker: the bundle
 * as PID 1 of a PID namespace of its own (unshare, which needs root or user namespaces).
 */
t.setTimeout(120_000)

const unshare = spawnSync('unshare', ['--pid', '--fork', '--kill-child', 'true'], { timeout: 10_000 })
const canUnshare = unshare.status === 0

// One bundle for both signals (built by the first test that needs it).
let outdir: string | null = null
t.teardown(() => { if (outdir !== null) rmSync(outdir, { recursive: true, force: true }) })
function bundle (t: Test): string {
  if (outdir === null) {
    const dir = mkdtempSync(join(tmpdir(), 'bff-pid1-'))
    outdir = dir
    const built = spawnSync(process.execPath, ['scripts/build.mjs'], { env: { ...process.env, BUILD_OUTDIR: dir }, encoding: 'utf8', timeout: 120_000 })
    t.equal(built.status, 0, `the bundle builds ${built.stderr}`)
  }
  return outdir
}

// SIGTERM is what `docker stop` and Kubernetes send; SIGINT is Ctrl-C on `docker run -it`, and
// src/early-signals.ts handles both.
for (const signal of ['SIGTERM', 'SIGINT'] as const) {
  t.test(`as PID 1, a ${signal} while the service starts ends it promptly (exit 0) instead of being dropped`, { skip: !canUnshare && 'unshare --pid is not allowed here' }, async (t) => {
    const outdir = bundle(t)
    // Start-up held for a second at a known point, the logger's creation (pino reads the host
    // name), well before it listens: the signal is sent then, whatever the machine's speed.
    const preload = join(outdir, 'slow-start.mjs')
    writeFileSync(preload, [
      "import os from 'node:os'",
      'const hostname = os.hostname',
      'let first = true',
      "os.hostname = function () { if (first) { first = false; process.stderr.write('starting\\n'); const end = Date.now() + 1000; while (Date.now() < end); } return hostname.call(os) }",
      ''
    ].join('\n'))
    const port = await freePort()
    const child = spawn('unshare', ['--pid', '--fork', '--kill-child', 'env', '-u', 'NODE_OPTIONS', process.execPath, '--import', preload, join(outdir, 'server.js')], {
      env: {
        PATH: process.env.PATH ?? '',
        _TAPJS_PROCESSINFO_COVERAGE_: '0',
        NODE_ENV: 'production',
        CV_API_KEY: 'org-secret-key-123',
        OIDC_ISSUER: 'https://idp.example.com',
        OIDC_CLIENT_ID: 'patient-web',
        HOST: '127.0.0.1',
        PORT: String(port),
        METRICS_PORT: '0'
      },
      stdio: ['ignore', 'pipe', 'pipe']
    })
    let out = ''
    let err = ''
    const [, stdout, stderr] = child.stdio as unknown as [null, Readable, Readable]
    stdout.setEncoding('utf8').on('data', (chunk: string) => { out += chunk })
    stderr.setEncoding('utf8').on('data', (chunk: string) => { err += chunk })
    const exited = once(child, 'exit')
    let node: number | null = null
    t.teardown(() => {
      if (node !== null) try { process.kill(node, 'SIGKILL') } catch {}
      child.kill('SIGKILL')
    })

    const startBy = Date.now() + 60_000
    while (!err.includes('starting') && Date.now() < startBy && child.exitCode === null) await sleep(10)
    t.match(err, 'starting', 'start-up reached the logger')
    node = Number(readFileSync(`/proc/${child.pid}/task/${child.pid}/children`, 'utf8').trim().split(' ')[0])
    t.match(readFileSync(`/proc/${node}/status`, 'utf8'), /^NSpid:\t\d+\t1$/m, 'node is PID 1 of its namespace, as in the image')

    process.kill(node, signal)
    const began = Date.now()
    const ended = await Promise.race([exited.then(() => true), sleep(8000).then(() => false)])
    t.ok(ended, `the process ended after the signal (${Date.now() - began} ms), rather than starting and serving`)
    t.ok(Date.now() - began < 5000, 'promptly')
    // Ended by the start-up's handler, or, when start-up ran on without a turn of the event loop, by
    // the shutdown's once it is in place (at worst as the listener comes up): exit 0 either way.
    t.equal(child.exitCode, 0, `exit 0 ${out.includes('"shutting down"') ? '(the shutdown handler\'s)' : '(at once)'}`)
    const probe = createServer()
    const listened = await new Promise<boolean>((resolve) => {
      probe.once('error', () => { resolve(false) })
      probe.listen(port, '127.0.0.1', () => { probe.close(); resolve(true) })
    })
    t.ok(listened, 'its port is free: nothing listens there')
  })
}
