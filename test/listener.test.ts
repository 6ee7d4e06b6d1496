import t from 'tap'
import { spawn, spawnSync } from 'node:child_process'
import { once } from 'node:events'
import { connect, createServer } from 'node:net'
import type { AddressInfo } from 'node:net'
import { lookup } from 'node:dns/promises'
import { isIP } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import Fastify from 'fastify'
import { listenAddress, listenRefusal } from '../src/listener.js'
import { freePort } from './helpers/ports.js'

// The tests below start src/server.ts, compiled on the fly by tsx, several times over: past the
// suite's 60 s per file on a loaded 2-core machine.
t.setTimeout(120_000)

t.test('a listen error the configuration mends names its variable; any other is not ours to word', async (t) => {
  const error = (code: string): Error => Object.assign(new Error(`listen ${code}`), { code })
  t.equal(listenRefusal(error('EADDRINUSE'), 'PORT', '0.0.0.0', 3000), 'Cannot listen:\n  PORT: 3000 on 0.0.0.0 is in use (EADDRINUSE)')
  t.equal(listenRefusal(error('EADDRINUSE'), 'METRICS_PORT', '::', 9464), 'Cannot listen:\n  METRICS_PORT: 9464 on :: is in use (EADDRINUSE)')
  t.match(listenRefusal(error('EACCES'), 'PORT', '0.0.0.0', 80), /^Cannot listen:\n {2}PORT: 80 on 0\.0\.0\.0 is not open to this process .*\(EACCES\)$/)
  t.equal(listenRefusal(error('EADDRNOTAVAIL'), 'PORT', '192.0.2.1', 3000), 'Cannot listen:\n  HOST: 192.0.2.1 is not an address of this machine (EADDRNOTAVAIL)')
  t.equal(listenRefusal(error('EAFNOSUPPORT'), 'PORT', '::1', 3000), 'Cannot listen:\n  HOST: ::1 is of an address family this machine does not have (EAFNOSUPPORT)')
  t.equal(listenRefusal(error('ENOTFOUND'), 'METRICS_PORT', 'bff.invalid', 9464), 'Cannot listen:\n  HOST: bff.invalid does not resolve (ENOTFOUND)')
  t.match(listenRefusal(error('EAI_AGAIN'), 'PORT', 'bff.internal', 3000), /^Cannot listen:\n {2}HOST: bff\.internal could not be resolved .*\(EAI_AGAIN\)$/)
  t.equal(listenRefusal(error('ECONNRESET'), 'PORT', '0.0.0.0', 3000), null)
  t.equal(listenRefusal(new Error('no code'), 'PORT', '0.0.0.0', 3000), null)
  t.equal(listenRefusal(null, 'PORT', '0.0.0.0', 3000), null)
  t.equal(listenRefusal('a string', 'PORT', '0.0.0.0', 3000), null)
})

/** A valid configuration for src/server.ts started as production starts it, with `env` over it. */
function serverEnv (env: Record<string, string>): Record<string, string> {
  return {
    PATH: process.env.PATH ?? '',
    // tap follows spawned processes; a tsx-compiled child's coverage of src/ maps onto other
    // lines than the suite's own (as in test/config.test.ts).
    _TAPJS_PROCESSINFO_COVERAGE_: '0',
    CV_API_KEY: 'org-secret-key-123',
    OIDC_ISSUER: 'https://idp.example.com',
    OIDC_CLIENT_ID: 'patient-web',
    HOST: '127.0.0.1',
    ...env
  }
}

/** src/server.ts as production starts it, with `env` over a valid configuration; its exit status and output. */
function start (env: Record<string, string>): { status: number | null, stdout: string, stderr: string } {
  const run = spawnSync(process.execPath, ['--import', 'tsx', 'src/server.ts'], {
    env: serverEnv(env),
    encoding: 'utf8',
    timeout: 30_000
  })
  return { status: run.status, stdout: run.stdout, stderr: run.stderr }
}

t.test('the server stops start-up with one message naming the variable when it cannot listen', async (t) => {
  const taken = createServer()
  taken.listen(0, '127.0.0.1')
  await once(taken, 'listening')
  t.teardown(() => { taken.close() })
  const port = String((taken.address() as AddressInfo).port)

  const cases: Array<[string, Record<string, string>, string]> = [
    ['PORT in use', { PORT: port, METRICS_PORT: '0' }, `PORT: ${port} on 127.0.0.1 is in use (EADDRINUSE)`],
    ['METRICS_PORT in use', { PORT: String(await freePort()), METRICS_PORT: port }, `METRICS_PORT: ${port} on 127.0.0.1 is in use (EADDRINUSE)`],
    // TEST-NET-1 (RFC 5737): an address no machine of ours has; binding it fails locally.
    ['HOST not an address here', { HOST: '192.0.2.1', PORT: port, METRICS_PORT: '0' }, 'HOST: 192.0.2.1 is not an address of this machine (EADDRNOTAVAIL)']
  ]
  for (const [what, env, line] of cases) {
    const run = start(env)
    t.equal(run.status, 1, what)
    t.equal(run.stderr, `Cannot listen:\n  ${line}\n`, `${what}: one message on stderr`)
    t.notMatch(run.stdout, /(\n|\\n)\s+at /, `${what}: no stack trace in the log`)
  }
})

t.test('start-up warns that patient hashes derive from the organization key when SERVICE_SECRET is not set, and only then', async (t) => {
  const taken = createServer()
  taken.listen(0, '127.0.0.1')
  await once(taken, 'listening')
  t.teardown(() => { taken.close() })
  // The warning is logged before listening: a port in use ends the run right after it.
  const port = String((taken.address() as AddressInfo).port)
  const warned = (stdout: string): boolean => stdout.split('\n').some((line) => line.includes('SERVICE_SECRET is not set'))
  t.ok(warned(start({ PORT: port, METRICS_PORT: '0' }).stdout), 'without it')
  t.notOk(warned(start({ PORT: port, METRICS_PORT: '0', SERVICE_SECRET: 'service-secret-0123456789abcdef-xyz' }).stdout), 'with it')
})

t.test('HOST=localhost binds one address, the first it resolves to; any other HOST is bound as given', async (t) => {
  const first = (await lookup('localhost')).address
  t.equal(await listenAddress('localhost'), first, 'an address, not the name Fastify would bind each address of')
  t.not(isIP(first), 0)
  t.equal(await listenAddress('0.0.0.0'), '0.0.0.0')
  t.equal(await listenAddress('::'), '::')
  t.equal(await listenAddress('replica.internal'), 'replica.internal', 'another name: Node binds its first address itself')
  const app = Fastify()
  t.teardown(async () => { await app.close() })
  await app.listen({ host: await listenAddress('localhost'), port: 0 })
  t.equal(app.addresses().length, 1, 'one server, the one the service sets up')
})

/** Whether a TCP connection to `host`:`port` is accepted (false once refused or after 2 s). */
async function accepts (host: string, port: number): Promise<boolean> {
  const socket = connect(port, host)
  const outcome = await Promise.race([
    once(socket, 'connect').then(() => true, () => false),
    sleep(2000).then(() => false)
  ])
  socket.destroy()
  return outcome
}

/**
 * The server itself binds what listenAddress gives, on both of its listeners: with `localhost`
 * resolving to two addresses (test/helpers/localhost-two-addresses.ts, since localhost has one
 * here), each listener is on the first only. Given the name, Fastify bound the second address too,
 * on a server of its own that the drain, the headers timeout and the refusals before routing never
 * reach, and that close() does not wait for.
 */
t.test('the server with HOST=localhost listens on the first address only, on the public and the metrics port', async (t) => {
  const port = await freePort()
  const metricsPort = await freePort()
  const child = spawn(process.execPath, ['--import', 'tsx', '--import', './test/helpers/localhost-two-addresses.ts', 'src/server.ts'], {
    env: serverEnv({ HOST: 'localhost', PORT: String(port), METRICS_PORT: String(metricsPort) }),
    stdio: ['ignore', 'ignore', 'pipe']
  })
  let stderr = ''
  child.stderr.on('data', (chunk: Buffer) => { stderr += chunk.toString() })
  const exited = once(child, 'exit')
  t.teardown(() => { if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL') })
  // Both listeners up within a generous bound (tsx compiles on the fly on a loaded machine). The
  // metrics listener starts after the public one; each on 127.0.0.1 too had it been given the name.
  const readyBy = Date.now() + 30_000
  const up = async (): Promise<boolean> => await accepts('127.0.0.2', metricsPort) || await accepts('127.0.0.1', metricsPort)
  while (!(await up()) && child.exitCode === null && Date.now() < readyBy) await sleep(100)
  // Time for Fastify's binding of the other address, had it been given the name.
  await sleep(300)
  t.ok(await accepts('127.0.0.2', port), `the public listener is on the first address ${stderr.slice(0, 300)}`)
  t.ok(await accepts('127.0.0.2', metricsPort), 'and the metrics listener')
  t.notOk(await accepts('127.0.0.1', port), 'the public port is not bound on the second address')
  t.notOk(await accepts('127.0.0.1', metricsPort), 'nor the metrics port')
  child.kill('SIGTERM')
  await Promise.race([exited, sleep(10_000)])
})
