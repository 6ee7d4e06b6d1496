import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { readdir, readFile } from 'node:fs/promises'
import { createServer } from 'node:net'
import { join } from 'node:path'
import t from 'tap'

/**
 * `npm run demo` as a user runs it: a child process that prints the walkthrough, stops cleanly on
 * Ctrl-C, refuses production, and names the variable to change when a port is taken.
 */

// Child processes and a browser start slowly on a busy 2-core CI machine: more than the
// suite's 60 s per file, still bounded.
t.setTimeout(180_000)

const FREE_PORTS = { DEMO_PORT: '0', DEMO_IDP_PORT: '0', DEMO_SANDBOX_PORT: '0', DEMO_PAGE_PORT: '0' }

interface Run { code: number | null, signal: NodeJS.Signals | null, stdout: string, stderr: string }

function startDemoProcess (env: Record<string, string>): { child: ReturnType<typeof spawn>, done: Promise<Run>, output: () => string } {
  // A clean environment (no NODE_ENV), and no coverage from the child: tap follows spawned
  // processes, and a tsx-compiled child's coverage of src/ maps onto other lines than the
  // suite's own and would corrupt its report.
  const inherited = { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '', _TAPJS_PROCESSINFO_COVERAGE_: '0' }
  // Node with tsx's loader, not the tsx CLI (`npm run demo`'s): the CLI relays a signal to its
  // child and, when the child has not reported it within 30 ms (a loaded machine), kills it and
  // exits 130, which the SIGINT test read as the demo failing to stop.
  const child = spawn(process.execPath, ['--import', 'tsx', 'demo/main.ts'], { env: { ...inherited, ...env }, stdio: ['ignore', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  child.stdout?.on('data', (chunk: Buffer) => { stdout += String(chunk) })
  child.stderr?.on('data', (chunk: Buffer) => { stderr += String(chunk) })
  // Never outlive the test, whatever happens.
  const killer = setTimeout(() => child.kill('SIGKILL'), 40_000)
  const done = once(child, 'exit').then(([code, signal]) => {
    clearTimeout(killer)
    return { code: code as number | null, signal: signal as NodeJS.Signals | null, stdout, stderr }
  })
  return { child, done, output: () => stdout }
}

async function waitFor (predicate: () => boolean, ms: number): Promise<void> {
  const end = Date.now() + ms
  while (!predicate()) {
    if (Date.now() > end) throw new Error('timed out')
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
}

t.test('prints the walkthrough, serves, and stops cleanly on SIGINT', async (t) => {
  const demo = startDemoProcess(FREE_PORTS)
  await waitFor(() => demo.output().includes('Ctrl-C stops everything'), 30_000)
  const output = demo.output()
  const page = /Patient web page\s+(http:\/\/localhost:\d+)/.exec(output)?.[1]
  const service = /Service \(BFF\)\s+(http:\/\/localhost:\d+)/.exec(output)?.[1]
  t.ok(page, 'names the page')
  t.ok(service, 'names the service')
  for (const email of ['alice@example.com', 'bob@example.com', 'carol@example.com']) t.match(output, email, `lists ${email}`)
  t.match(output, 'demo:id-token', 'mobile walkthrough: ID token')
  t.match(output, '/auth/session', 'mobile walkthrough: session')
  t.match(output, /curl -s -X POST \S+\/appointments\/[0-9a-f-]{36}\/cancel/, 'mobile walkthrough: cancel')

  const ready = await fetch(`${service}/readyz`)
  t.equal(ready.status, 200, 'the service answers')
  t.match(await ready.json(), { data: { sharedState: 'memory' } }, 'on in-memory state')
  const html = await fetch(`${page}/`)
  t.match(await html.text(), '<title>Patient appointments', 'the page is served')

  demo.child.kill('SIGINT')
  const run = await demo.done
  t.equal(run.code, 0, 'exit code 0')
  t.match(run.stdout, 'stopping the demo', 'says it stops')
  await t.rejects(fetch(`${service}/healthz`, { signal: AbortSignal.timeout(2000) }), 'nothing listens any more')
})

t.test('refuses to run with NODE_ENV=production', async (t) => {
  const run = await startDemoProcess({ ...FREE_PORTS, NODE_ENV: 'production' }).done
  t.equal(run.code, 1)
  t.match(run.stderr, 'refuses to run with NODE_ENV=production')
  t.notMatch(run.stdout, 'Patient web page')
})

t.test('a taken port stops start-up with the variable to change', async (t) => {
  const blocker = createServer()
  blocker.listen(0, '127.0.0.1')
  await once(blocker, 'listening')
  t.teardown(() => { blocker.close() })
  const port = String((blocker.address() as { port: number }).port)
  const run = await startDemoProcess({ ...FREE_PORTS, DEMO_PAGE_PORT: port }).done
  t.equal(run.code, 1)
  t.match(run.stderr, `Port ${port} (page) is already in use`)
  t.match(run.stderr, 'DEMO_PAGE_PORT')
})

t.test('a bad port variable is refused by name', async (t) => {
  const run = await startDemoProcess({ ...FREE_PORTS, DEMO_IDP_PORT: 'http' }).done
  t.equal(run.code, 1)
  t.match(run.stderr, 'DEMO_IDP_PORT must be a port number')
})

async function sourceFiles (dir: string): Promise<string[]> {
  const entries = await readdir(dir, { withFileTypes: true, recursive: true })
  return entries.filter((entry) => entry.isFile() && entry.name.endsWith('.ts')).map((entry) => join(entry.parentPath, entry.name))
}

t.test('production code never imports the demo', async (t) => {
  for (const file of await sourceFiles('src')) {
    const text = await readFile(file, 'utf8')
    t.notMatch(text, /from ['"][./]*\/?demo\//, `${file} does not import demo/`)
    if (!file.endsWith('dev-idp.ts') && !file.endsWith('.d.ts')) {
      t.notMatch(text, /['"]\.{1,2}\/(web\/)?dev-idp\.js['"]/, `${file} does not import the development IdP`)
    }
  }
})
