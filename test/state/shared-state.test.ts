import t from 'tap'
import { createServer, connect, type Socket } from 'node:net'
import { once } from 'node:events'
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import { pino } from 'pino'
import { startRedis } from '../helpers/redis.js'
import { createSharedState } from '../../src/state/redis.js'

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

t.test('a connection that goes silent is given up and replaced, not kept for the kernel\'s quarter of an hour', async (t) => {
  const relay = await silenceableRelay()
  t.teardown(relay.close)
  const state = createSharedState({ url: relay.url, log: pino({ level: 'silent' }), commandTimeoutMs: 100 })
  t.teardown(() => state.close())
  const client = state.redis!
  const readyBy = Date.now() + 5000
  while (state.mode() !== 'redis' && Date.now() < readyBy) await sleep(10)
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
  const state = createSharedState({ url: relay.url, log: pino({ level: 'silent' }), commandTimeoutMs: 100 })
  t.teardown(() => state.close())
  const client = state.redis!
  const readyBy = Date.now() + 5000
  while (state.mode() !== 'redis' && Date.now() < readyBy) await sleep(10)
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
  // destroy it: redis/ioredis#2147).
  const end = Date.now() + 1500
  let failed = 0
  while (Date.now() < end) {
    if (await client.ping().catch(() => null) !== 'PONG') failed += 1
    await sleep(50)
  }
  t.equal(closes, 1, 'one close: the lost connection only')
  t.equal(failed, 0, 'every command answered on the new connection')
})
