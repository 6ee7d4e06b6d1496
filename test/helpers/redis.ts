import { spawn, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { setTimeout as sleep } from 'node:timers/promises'
import { Redis, type RedisOptions } from 'ioredis'
import { DATA_SINCE_KEY } from '../../src/state/redis.js'
import { freePort } from './ports.js'

/** A throwaway redis-server on a free loopback port, owned by one test suite. */
export interface RedisServer {
  url: string
  port: number
  /** Kills the server (SIGKILL: a crash, not a shutdown). */
  stop: () => Promise<void>
  /** Starts it again on the same port, empty. */
  start: () => Promise<void>
  /** Flushes every key. */
  flush: () => Promise<void>
}

interface TeardownHost { teardown: (fn: () => unknown) => void }

async function waitReady (port: number, deadlineMs: number): Promise<void> {
  const end = Date.now() + deadlineMs
  for (;;) {
    const probe = new Redis({ port, host: '127.0.0.1', lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null, enableOfflineQueue: false })
    probe.on('error', () => {})
    try {
      await probe.connect()
      await probe.ping()
      probe.disconnect()
      return
    } catch {
      probe.disconnect()
      if (Date.now() > end) throw new Error(`redis-server on ${port} did not start`)
      await sleep(20)
    }
  }
}

export interface StartRedisOptions {
  /** More redis-server arguments, after the helper's own (e.g. `['--maxmemory-policy', 'allkeys-lru']`); kept by `start`. */
  args?: readonly string[]
}

export async function startRedis (t: TeardownHost, options: StartRedisOptions = {}): Promise<RedisServer> {
  const port = await freePort()
  let child: ChildProcess | null = null
  const start = async (): Promise<void> => {
    child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--protected-mode', 'no', '--loglevel', 'warning', ...(options.args ?? [])], { stdio: 'ignore' })
    await waitReady(port, 5000)
  }
  const stop = async (): Promise<void> => {
    const running = child
    child = null
    if (running === null || running.exitCode !== null) return
    const exited = once(running, 'exit')
    running.kill('SIGKILL')
    await exited
  }
  const flush = async (): Promise<void> => {
    const client = redisClient({ port, host: '127.0.0.1', maxRetriesPerRequest: 0 })
    await client.flushall()
    client.disconnect()
  }
  await start()
  t.teardown(stop)
  return { url: `redis://127.0.0.1:${port}`, port, stop, start, flush }
}

/**
 * A test's own client of a throwaway Redis. Its connection's errors (the server killed before the
 * client is closed, a restart under test) reach the test through its commands' rejections; with
 * no listener, ioredis would also print each one to stderr as an "Unhandled error event".
 */
export function redisClient (target: string | RedisOptions, options: RedisOptions = {}): Redis {
  const client = typeof target === 'string' ? new Redis(target, options) : new Redis({ ...target, ...options })
  client.on('error', () => {})
  return client
}

/** Now on Redis's own clock (`TIME`), in milliseconds. */
export async function redisNowMs (client: Redis): Promise<number> {
  const [sec, usec] = (await client.time()) as [number | string, number | string]
  return Number(sec) * 1000 + Math.floor(Number(usec) / 1000)
}

/** How long ago, on Redis's clock, its data began: the age of the shared state's marker. */
export async function dataAgeMs (client: Redis): Promise<number> {
  return await redisNowMs(client) - Number(await client.get(DATA_SINCE_KEY))
}
