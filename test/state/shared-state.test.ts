import t, { type Test } from 'tap'
import { createServer, connect, type Socket } from 'node:net'
import { once } from 'node:events'
import { stat } from 'node:fs'
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import { pino } from 'pino'
import { redisNowMs, startRedis, redisClient } from '../helpers/redis.js'
import { coalesceWrites, createSharedState, DATA_SINCE_KEY, type SharedState } from '../../src/state/redis.js'
import { freePort } from '../helpers/ports.js'

const redis = await startRedis(t)

/**
 * A TCP relay in front of Redis whose open connections can go silent (nothing passes either way,
 * nothing is closed: a peer that vanished without a reset), while new connections still reach
 * Redis (the address moved on).
 */
async function silenceableRelay (): Promise<{ url: string, silence: () => void, reset: () => void, close: () => void }> {
  const pairs: Array<{ client: Socket, server: Socket, silent: boolean }> = []
  const relay = createServer((client) => {
    const server = connect(redis.port, '127.0.0.1')
    const pair = { client, server, silent: false }
    pairs.push(pair)
    client.on('data', (chunk) => { if (!pair.silent) server.write(chunk) })
    server.on('data', (chunk) => { if (!pair.silent) client.write(chunk) })
    for (const socket of [client, server]) socket.on('error', () => {})
    client.on('close', () => server.destroy())
    server.on('close', () => client.destroy())
  })
  relay.listen(0, '127.0.0.1')
  await once(relay, 'listening')
  const { port } = relay.address() as { port: number }
  return {
    url: `redis://127.0.0.1:${port}`,
    silence: () => { for (const pair of pairs) pair.silent = true },
    reset: () => { for (const pair of pairs.splice(0)) pair.client.destroy() },
    close: () => {
      for (const pair of pairs) { pair.client.destroy(); pair.server.destroy() }
      relay.close()
    }
  }
}

/** A shared state on `url`, connected (Redis answering) before it is handed over, closed at the end. */
async function connected (t: Test, url: string, options: { commandTimeoutMs: number, socketTimeoutMs?: number }): Promise<SharedState> {
  const state = createSharedState({ url, log: pino({ level: 'silent' }), ...options })
  t.teardown(() => state.close())
  const readyBy = Date.now() + 5000
  while (state.mode() !== 'redis' && Date.now() < readyBy) await sleep(10)
  return state
}

t.test('a connection that goes silent is given up and replaced, not kept for the kernel\'s quarter of an hour', async (t) => {
  const relay = await silenceableRelay()
  t.teardown(relay.close)
  const state = await connected(t, relay.url, { commandTimeoutMs: 100, socketTimeoutMs: 1000 })
  const client = state.redis!
  t.equal(await client.ping(), 'PONG')

  relay.silence()
  const silencedAt = performance.now()
  await t.rejects(client.ping(), /Command timed out/, 'a command on the silent connection times out')
  // Commands go on failing for a moment; then the client gives the socket up and reconnects.
  let answered: string | null = null
  while (answered === null && performance.now() - silencedAt < 5000) {
    answered = await client.ping().catch(() => null)
    if (answered === null) await sleep(50)
  }
  t.equal(answered, 'PONG', 'Redis answers again over a new connection')
  const took = performance.now() - silencedAt
  t.ok(took < 3000, `within the socket timeout (1 s here) and a reconnect: ${Math.round(took)} ms`)
})

t.test('after a connection is lost with a command outstanding, the new connection is not cut by the old one\'s socket timeout', async (t) => {
  const relay = await silenceableRelay()
  t.teardown(relay.close)
  const state = await connected(t, relay.url, { commandTimeoutMs: 100, socketTimeoutMs: 1000 })
  const client = state.redis!
  let closes = 0
  client.on('close', () => { closes += 1 })
  // A command outstanding (its socket timeout armed, 1 s here), then the connection is lost.
  relay.silence()
  const outstanding = client.ping().catch(() => null)
  await sleep(20)
  relay.reset()
  await outstanding
  const backBy = Date.now() + 5000
  while (state.mode() !== 'redis' && Date.now() < backBy) await sleep(10)
  t.equal(state.mode(), 'redis', 'reconnected')
  // Past the old connection's deadline, the new one serves on (ioredis 5.11 let the old timer
  // destroy it: redis/ioredis#2147, fixed in ioredis 6 by #2148).
  const end = Date.now() + 1500
  let failed = 0
  while (Date.now() < end) {
    if (await client.ping().catch(() => null) !== 'PONG') failed += 1
    await sleep(50)
  }
  t.equal(closes, 1, 'one close: the lost connection only')
  t.equal(failed, 0, 'every command answered on the new connection')
})

t.test('a reply nested deeper than the stack (a compromised Redis, or one on the path): that connection is dropped, the process goes on', async (t) => {
  // ioredis 5 parsed replies with redis-parser 3, which recurses once per level of nesting: the
  // RangeError escaped from the socket's data handler, an uncaught exception that ended the
  // process (redis/ioredis#2108). ioredis 6 treats it as a fatal error of that connection.
  let poisonNext = false
  const sockets: Socket[] = []
  const relay = createServer((client) => {
    const server = connect(redis.port, '127.0.0.1')
    sockets.push(client, server)
    client.on('data', (chunk) => server.write(chunk))
    server.on('data', (chunk) => {
      if (!poisonNext) {
        client.write(chunk)
        return
      }
      poisonNext = false
      client.write(`${'*1\r\n'.repeat(200_000)}:1\r\n`)
    })
    for (const socket of [client, server]) socket.on('error', () => {})
    client.on('close', () => server.destroy())
    server.on('close', () => client.destroy())
  })
  relay.listen(0, '127.0.0.1')
  await once(relay, 'listening')
  t.teardown(() => { for (const socket of sockets) socket.destroy(); relay.close() })
  const state = await connected(t, `redis://127.0.0.1:${(relay.address() as { port: number }).port}`, { commandTimeoutMs: 1000 })
  const client = state.redis!
  t.equal(state.mode(), 'redis')
  poisonNext = true
  const poisoned = await client.ping().then(() => 'answered', (error: Error) => error.message)
  t.not(poisoned, 'answered', `the command that got the poisoned reply fails: ${poisoned}`)
  const by = Date.now() + 5000
  while (state.mode() === 'redis' && Date.now() < by) await sleep(5)
  t.equal(state.mode(), 'degraded', 'that connection is dropped')
  while (state.mode() !== 'redis' && Date.now() < by) await sleep(10)
  t.equal(state.mode(), 'redis', 'a new connection is made')
  t.equal(await client.ping(), 'PONG', 'and serves')
})

/** Blocks this process's event loop, as a CPU-throttled container or a long synchronous task does. */
function stall (ms: number): void {
  const end = performance.now() + ms
  while (performance.now() < end) { /* busy */ }
}

t.test('a stall of this process longer than the bound does not fail commands Redis answered in time', async (t) => {
  const state = await connected(t, redis.url, { commandTimeoutMs: 100 })
  const client = state.redis!
  // From an I/O callback, as a request handler runs: after it the loop checks its timers before
  // it reads sockets again.
  const inIoCallback = async <T>(fn: () => T): Promise<T> => await new Promise((resolve) => { stat('.', () => { resolve(fn()) }) })
  // Sent, then the loop stalls: the answer waits in the socket while the timers come due.
  const sentBefore = await inIoCallback(() => {
    const ping = client.ping()
    stall(300)
    return ping
  })
  t.equal(await sentBefore, 'PONG', 'answered in time, read after the stall')
  // Sent as the stores send (writes held for the loop's check phase), then the loop stalls: the
  // command leaves only after the stall.
  const heldDuring = await inIoCallback(() => {
    coalesceWrites(client)
    const ping = client.ping()
    stall(300)
    return ping
  })
  t.equal(await heldDuring, 'PONG', 'its time is counted from when the loop could serve it')
})

t.test('a command that gets no answer still fails within the bound', async (t) => {
  const relay = await silenceableRelay()
  t.teardown(relay.close)
  const state = await connected(t, relay.url, { commandTimeoutMs: 150 })
  const client = state.redis!
  relay.silence()
  const began = performance.now()
  const pings = await Promise.allSettled([client.ping(), client.ping(), client.ping()])
  const took = performance.now() - began
  t.ok(pings.every((ping) => ping.status === 'rejected' && (ping.reason as Error).message === 'Command timed out'), 'each one timed out')
  t.ok(took >= 140 && took < 400, `after the bound and at most a tick more: ${Math.round(took)} ms`)
})

t.test('a replica\'s first connection: careful unless Redis\'s data is older than its span, and after any break it saw', async (t) => {
  const admin = redisClient(redis.url)
  t.teardown(() => admin.disconnect())
  // Data that has existed for ten seconds, on Redis's clock.
  await admin.set(DATA_SINCE_KEY, await redisNowMs(admin) - 10_000)
  await admin.call('ACL', 'SETUSER', 'no-scripts', 'on', '>pw', '~*', '&*', '+@all', '-eval', '-evalsha')
  const quiet = pino({ level: 'silent' })
  const states = {
    // The marker says how old the data is.
    known: createSharedState({ url: redis.url, log: quiet }),
    // The script is refused: as careful as after a break.
    refused: createSharedState({ url: redis.url.replace('redis://', 'redis://no-scripts:pw@'), log: quiet })
  }
  // Started while Redis cannot be reached (here: nothing listens yet), and counting alone meanwhile.
  const port = await freePort()
  const late = createSharedState({ url: `redis://127.0.0.1:${port}`, log: quiet })
  t.teardown(() => Promise.all([states.known.close(), states.refused.close(), late.close()]))
  await sleep(300)
  t.equal(late.mode(), 'degraded')
  const forwarder = createServer((client) => {
    const server = connect(redis.port, '127.0.0.1')
    client.pipe(server).pipe(client)
    for (const socket of [client, server]) socket.on('error', () => {})
  })
  forwarder.listen(port, '127.0.0.1')
  t.teardown(() => { forwarder.close() })
  const readyBy = Date.now() + 5000
  while ([states.known, states.refused, late].some((state) => state.mode() !== 'redis') && Date.now() < readyBy) await sleep(10)
  await admin.ping()
  await sleep(100)
  t.ok(states.known.redisFor() >= 9000, `the data's age: ${Math.round(states.known.redisFor())} ms`)
  t.ok(states.refused.redisFor() < 1000, `no age known: since it connected (${Math.round(states.refused.redisFor())} ms)`)
  t.ok(late.redisFor() < 1000, `a break seen before its first connection: since then (${Math.round(late.redisFor())} ms)`)
})

t.test('a command sent after a stall gets the bound from its own sending, not the stall\'s', async (t) => {
  const relay = await silenceableRelay()
  t.teardown(relay.close)
  const state = await connected(t, relay.url, { commandTimeoutMs: 150, socketTimeoutMs: 10_000 })
  const client = state.redis!
  relay.silence()
  const { began, failed } = await new Promise<{ began: number, failed: Promise<unknown> }>((resolve) => {
    stat('.', () => {
      // A pending command keeps the bound's timer going through the stall.
      client.ping().catch(() => {})
      stall(1000)
      const began = performance.now()
      resolve({ began, failed: client.ping().then(() => 'answered', (error: Error) => error.message) })
    })
  })
  t.equal(await failed, 'Command timed out')
  const took = performance.now() - began
  t.ok(took < 400, `within its bound and a tick or two: ${Math.round(took)} ms`)
})

t.test('a task run when Redis is back that fails is logged, and the others still run', async (t) => {
  const lines: Array<{ level: number, msg: string }> = []
  const log = pino({ level: 'info' }, { write (line: string) { lines.push(JSON.parse(line) as { level: number, msg: string }) } })
  const state = createSharedState({ url: redis.url, log })
  t.teardown(() => state.close())
  let ran = 0
  state.onBack(() => { throw new Error('a failing task') })
  state.onBack(async () => { ran++ })
  // The first connection's ready runs them.
  const settled = (): boolean => ran > 0 && lines.some((line) => line.level === 50)
  for (let i = 0; i < 100 && !settled(); i++) await sleep(20)
  t.equal(ran, 1, 'the other task ran')
  t.ok(lines.some((line) => line.level === 50 && line.msg === 'shared state: a task run when Redis is back failed'), 'the failure is an error line')
})

t.test('a database REDIS_URL names that Redis refuses: degraded, never its state in database 0', async (t) => {
  const lines: Array<{ level: number, msg: string, err?: { message?: string } }> = []
  const log = pino({ level: 'info' }, { write (line: string) { lines.push(JSON.parse(line) as { level: number, msg: string }) } })
  const admin = redisClient(redis.url)
  t.teardown(() => admin.disconnect())
  await admin.flushdb()
  // A default Redis has databases 0 to 15: ioredis's SELECT 99 fails, and without a check it
  // would carry on, ready, on database 0.
  const state = createSharedState({ url: `${redis.url}/99`, log, logEveryMs: 60_000 })
  t.teardown(() => state.close())
  const refused = (): boolean => lines.some((line) => line.level === 50)
  for (let i = 0; i < 100 && !refused(); i++) await sleep(20)
  await sleep(300) // reconnects on its backoff meanwhile
  t.equal(state.mode(), 'degraded')
  t.not(state.redis?.status, 'ready', 'no connection left ready for the stores')
  await t.rejects(state.redis!.set('bff:probe', '1'), 'a command fails at once')
  const errors = lines.filter((line) => line.level >= 40)
  t.same(errors.map((line) => [line.level, line.msg, line.err?.message]), [
    [50, 'shared state: Redis refused the database REDIS_URL names; using per-process fallback until it accepts it', 'ERR DB index is out of range']
  ], 'one line, saying why, for the minute; nothing from the dropped connections')
  t.equal(await admin.dbsize(), 0, 'nothing written to database 0')
})

t.test('a failover that demotes the node a connection is on: the connection is replaced, not kept answering READONLY', async (t) => {
  const promoted = await startRedis(t)
  // The endpoint the service knows: at first the old primary, then (a failover) the new one.
  let target = redis.port
  const sockets: Socket[] = []
  const relay = createServer((client) => {
    const server = connect(target, '127.0.0.1')
    sockets.push(client, server)
    client.pipe(server).pipe(client)
    for (const socket of [client, server]) socket.on('error', () => {})
  })
  relay.listen(0, '127.0.0.1')
  await once(relay, 'listening')
  t.teardown(() => { for (const socket of sockets) socket.destroy(); relay.close() })
  const demoted = redisClient(redis.url)
  t.teardown(async () => { await demoted.replicaof('NO', 'ONE'); demoted.disconnect() })

  const state = await connected(t, `redis://127.0.0.1:${(relay.address() as { port: number }).port}`, { commandTimeoutMs: 250 })
  const client = state.redis!
  t.equal(await client.set('bff:failover', 'before'), 'OK')
  // The old primary stays up as a replica of the new one, and keeps its client connections.
  await demoted.replicaof('127.0.0.1', String(promoted.port))
  target = promoted.port
  await t.rejects(client.set('bff:failover', 'during'), /READONLY/, 'the demoted node refuses the write')
  let written = false
  for (let i = 0; i < 100 && !written; i++) {
    await sleep(20)
    written = await client.set('bff:failover', 'after').then(() => true, () => false)
  }
  t.ok(written, 'a write succeeds again, within 2 s')
  const fresh = redisClient(promoted.url)
  t.teardown(() => fresh.disconnect())
  t.equal(await fresh.get('bff:failover'), 'after', 'on the new primary')
})

t.test('an endpoint that stays a replica: replaced once, not on every write, and one "reachable again" line a minute', async (t) => {
  const primary = await startRedis(t)
  const replica = await startRedis(t, { args: ['--replicaof', '127.0.0.1', String(primary.port)] })
  const lines: Array<{ msg: string }> = []
  const log = pino({ level: 'info' }, { write (line: string) { lines.push(JSON.parse(line) as { msg: string }) } })
  const watched = createSharedState({ url: replica.url, log })
  t.teardown(() => watched.close())
  for (let i = 0; i < 250 && watched.mode() !== 'redis'; i++) await sleep(20)
  t.equal(watched.mode(), 'redis', 'a replica answers reads and the ready check')
  let connects = 0
  watched.redis!.on('connect', () => { connects++ })
  let refused = 0
  const until = Date.now() + 1500
  while (Date.now() < until) {
    await watched.redis!.set('bff:replica', '1').catch((error: Error) => { if (error.message.startsWith('READONLY')) refused++ })
    await sleep(20)
  }
  t.ok(refused > 10, `the replica refused the writes (${refused})`)
  t.ok(connects <= 1, `one reconnect at most in 1.5 s, not one per write (${connects})`)
  // Another break within the minute: back again, silently.
  for (let i = 0; i < 250 && watched.redis!.status !== 'ready'; i++) await sleep(20)
  watched.redis!.disconnect(true)
  await sleep(50)
  for (let i = 0; i < 250 && watched.redis!.status !== 'ready'; i++) await sleep(20)
  await sleep(50)
  t.equal(lines.filter((line) => line.msg === 'shared state: Redis reachable again').length, 1, 'one line for the two breaks of the minute')
})

t.test('every outage line is followed by a "reachable again" once Redis is back, throttled or not', async (t) => {
  const server = await startRedis(t)
  const lines: string[] = []
  const log = pino({ level: 'info' }, { write (line: string) { lines.push((JSON.parse(line) as { msg: string }).msg) } })
  let clock = 0
  const state = createSharedState({ url: server.url, log, logEveryMs: 600, now: () => clock })
  t.teardown(() => state.close())
  const until = async (mode: string): Promise<void> => { for (let i = 0; i < 300 && state.mode() !== mode; i++) await sleep(20) }
  await until('redis')
  const told = (): string[] => lines.filter((line) => /unreachable|reachable again/.test(line)).map((line) => line.includes('again') ? 'back' : 'down')
  // The outage line comes with the first failed reconnect, after the connection closed.
  const untilTold = async (count: number): Promise<void> => { for (let i = 0; i < 300 && told().length < count; i++) await sleep(20) }
  await server.stop()
  await untilTold(1)
  t.same(told(), ['down'])
  // Within the minute of the first line: the reconnects that fail before the server is back, as
  // many as a loaded machine makes, stay silent.
  clock = 599
  await server.start()
  await until('redis')
  t.same(told(), ['down', 'back'])
  clock = 700 // a minute (600 ms here) after the first outage line, 101 ms after the back line
  await server.stop()
  await untilTold(3)
  t.same(told(), ['down', 'back', 'down'])
  clock = 710
  await server.start()
  await until('redis')
  t.same(told(), ['down', 'back', 'down', 'back'], 'the log does not end on an outage that is over')
})

t.test('a failed command\'s pause: a shorter one asked meanwhile does not end it early, and Redis is back only when it ends', async (t) => {
  let clock = 0
  const state = createSharedState({ url: redis.url, log: pino({ level: 'silent' }), now: () => clock })
  t.teardown(() => state.close())
  for (let i = 0; i < 250 && state.mode() !== 'redis'; i++) await sleep(20)
  t.equal(state.mode(), 'redis')
  await sleep(50) // the first connection's own back() has run
  let backs = 0
  state.onBack(() => { backs++ })
  const told = (): number => backs
  state.degradeFor(1000)
  state.degradeFor(10)
  clock = 500
  t.equal(state.mode(), 'degraded', 'the longer pause holds')
  clock = 1000
  t.equal(state.mode(), 'redis', 'and ends when it said')
  for (let i = 0; i < 100 && told() < 1; i++) await sleep(20)
  t.equal(backs, 1, 'its end is told to the listeners')
  // The pause-end timer, armed for 50 ms, finds the pause extended meanwhile: it waits again.
  clock = 2000
  state.degradeFor(50)
  clock = 2020
  state.degradeFor(100)
  await sleep(120)
  t.equal(backs, 1, 'not back while the pause goes on')
  t.equal(state.mode(), 'degraded')
  clock = 2120
  for (let i = 0; i < 50 && told() < 2; i++) await sleep(20)
  t.equal(backs, 2, 'back once the extended pause ended')
})

t.test('a pause that ends while the connection is down is not told as Redis back: the reconnection is', async (t) => {
  const server = await startRedis(t)
  let clock = 0
  const state = createSharedState({ url: server.url, log: pino({ level: 'silent' }), now: () => clock })
  t.teardown(() => state.close())
  for (let i = 0; i < 250 && state.mode() !== 'redis'; i++) await sleep(20)
  await sleep(50) // the first connection's own back() has run
  let backs = 0
  state.onBack(() => { backs++ })
  const told = (): number => backs
  state.degradeFor(300)
  await server.stop()
  for (let i = 0; i < 100 && state.redis!.status === 'ready'; i++) await sleep(10)
  t.not(state.redis!.status, 'ready')
  // Refused by the client itself (enableOfflineQueue: false), not queued for a reconnection (its
  // message says which; no time bound, which a stalled machine would break).
  await t.rejects(state.redis!.ping(), /enableOfflineQueue/, 'a command without a connection fails at once')
  clock = 300
  await sleep(500)
  t.equal(backs, 0, 'the pause ended without a connection: nothing to run yet')
  await server.start()
  for (let i = 0; i < 250 && told() < 1; i++) await sleep(20)
  t.equal(backs, 1, 'run once the client is ready again')
})
