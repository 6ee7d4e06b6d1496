import { hash, randomUUID } from 'node:crypto'
import type { Redis } from 'ioredis'
import { coalesceWrites, FAILED_COMMAND_PAUSE_MS, isCommandTimeout, type SharedState } from '../state/redis.js'
import type { Awaitable } from '../state/awaitable.js'
import { LUA_NOW_MS, redisScript } from '../state/redis-script.js'
import { OwnError } from '../errors.js'

/**
 * Idempotency records, keyed by (patient scope, key). One record is in one of three states:
 *
 * - in flight: someone owns it (a random token) until `until`; after that the owner is presumed
 *   dead (a replica killed mid-request) and the next `begin` takes it over. The owner marks the
 *   record `sending` just before it hands the cancel to the upstream: a takeover of a record so
 *   marked is an unknown outcome (the dead owner may have cancelled), and the mark stays through
 *   the takeover until an owner records what became of the cancel; a record never so marked
 *   starts afresh (nothing was sent: its owner died, or lost its last write, before the cancel). The
 *   marker's short life is a timestamp inside the record rather than a key TTL so that the
 *   fingerprint survives it: a retry with another body is still a mismatch.
 * - unknown: the cancel may have reached the upstream but no answer came back.
 * - done: the answer (status and envelope) to replay.
 *
 * Only the fingerprint (a hash), the state, the answer and timestamps are kept: never the reason
 * or the email. Redis names a record by a hash of scope and key; the memory store files it under
 * the key itself (mapKeyOf).
 */

export interface StoredAnswer {
  statusCode: number
  body: object
}

export type BeginResult =
  | { kind: 'started', token: string }
  | { kind: 'in-flight', retryAfterMs: number }
  | { kind: 'mismatch' }
  | { kind: 'replay', answer: StoredAnswer, completedAt: number }
  /**
   * `endsAt`: the end of the appointment the cancel was for (ms epoch), and `appointment`: its `id`
   * as the upstream lists it, each when the record knows it.
   */
  | { kind: 'unknown-outcome', token: string, endsAt: number | null, appointment: string | null }

export interface BeginOptions {
  /** Life of the whole record (raised to at least `inFlightTtlMs`). */
  ttlMs: number
  /** How long an owner may hold the record before it is presumed dead. */
  inFlightTtlMs: number
  /**
   * A finished record whose answer is not a 200 is taken over (`started`) instead of replayed:
   * single flight's retry after an error, claimed by one request only, so that identical retries
   * on other replicas follow it rather than each sending its own cancel.
   */
  retakeFailed?: boolean
}

/**
 * The memory store answers at once (a keyed cancel passes it on every request: begin, then
 * complete, release or an unknown outcome); the Redis store answers with a promise. Either may fail: by throwing, or by rejecting.
 */
export interface IdempotencyStore {
  /** Atomically claims the record, or says why not. */
  begin (scope: string, key: string, fingerprint: string, options: BeginOptions): Awaitable<BeginResult>
  /** Stores the answer for `ttlMs`, if `token` still owns the record. */
  complete (scope: string, key: string, token: string, answer: StoredAnswer, ttlMs: number): Awaitable<boolean>
  /**
   * Called just before the cancel is handed to the upstream: true if `token` still owns the record
   * and its in-flight marker has not expired (no retry may have taken it over); the record now
   * says the cancel may have been sent, and its marker lives at least `holdMs` more, so that no
   * retry takes over while the send itself runs. False: the cancel must not be sent. `endsAt`, the
   * end of the appointment (ms epoch) when known, stays with the record for whoever later resolves
   * an unknown outcome: an appointment that has ended is absent from the list too. So does
   * `appointment`, its `id` as the upstream lists it when known (the cancel may name it by its
   * `agentEventId`): a confirmation is audited under it, as the cancels that found it are.
   */
  markSending (scope: string, key: string, token: string, holdMs: number, endsAt?: number | null, appointment?: string | null): Awaitable<boolean>
  /** Keeps the fingerprint, drops ownership: the next `begin` must resolve the outcome. */
  markUnknown (scope: string, key: string, token: string, ttlMs: number): Awaitable<boolean>
  /** Deletes the record (nothing reached the upstream), if `token` still owns it. */
  release (scope: string, key: string, token: string): Awaitable<boolean>
}

/** The store could not answer (Redis down, slow, or the memory store full). */
export class IdempotencyStoreError extends OwnError {
  constructor (message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'IdempotencyStoreError'
  }
}

function sha256 (text: string): string {
  return hash('sha256', text, 'hex')
}

/**
 * Where a record lives. Both parts are hashed: the key is the client's text and could carry
 * anything, and a bounded length keeps Redis keys and memory small. The scope is the hash tag so
 * that a patient's records share a Cluster slot.
 */
export function recordId (scope: string, key: string): { slot: string, id: string } {
  return { slot: sha256(`scope\0${scope}`).slice(0, 32), id: sha256(`key\0${scope}\0${key}`).slice(0, 32) }
}

export interface MemoryStoreOptions {
  /** Injected by tests; Date.now otherwise. */
  now?: () => number
  /** Most records held; expired ones are swept first, then `begin` fails (a 503, never a guess). */
  maxEntries?: number
  /** Expired records are swept at most this often (ms) outside of a full store. */
  sweepEveryMs?: number
}

type MemoryRecord =
  | { state: 'in-flight', fingerprint: string, token: string, until: number, sending: boolean, endsAt: number | null, appointment: string | null, expiresAt: number }
  | { state: 'unknown', fingerprint: string, endsAt: number | null, appointment: string | null, expiresAt: number }
  | { state: 'done', fingerprint: string, statusCode: number, body: string, completedAt: number, expiresAt: number }

/** One process, no Redis: the same semantics in a Map, bounded and swept. */
export function createMemoryIdempotencyStore (options: MemoryStoreOptions = {}): IdempotencyStore & { size: () => number } {
  const now = options.now ?? Date.now
  const maxEntries = options.maxEntries ?? 100_000
  // Every second: a pass over the map is cheap, and a record past its time (an in-flight marker
  // left by a failed write, a replay past its 24 hours) is gone soon after.
  const sweepEveryMs = options.sweepEveryMs ?? 1_000
  const records = new Map<string, MemoryRecord>()
  let lastSweep = now()

  function sweep (at: number): void {
    lastSweep = at
    for (const [id, record] of records) {
      if (record.expiresAt <= at) records.delete(id)
    }
  }

  // In-process only, so nothing to hash: the scope is a hash already and the key is at most 255
  // characters (parseIdempotencyKey) or a single-flight fingerprint.
  const mapKeyOf = (scope: string, key: string): string => `${scope}\0${key}`

  function live (mapKey: string, at: number): MemoryRecord | undefined {
    const record = records.get(mapKey)
    if (record === undefined || record.expiresAt > at) return record
    records.delete(mapKey)
    return undefined
  }

  function owned (record: MemoryRecord | undefined, token: string): record is MemoryRecord & { state: 'in-flight' } {
    return record !== undefined && record.state === 'in-flight' && record.token === token
  }

  return {
    size: () => records.size,

    begin (scope, key, fingerprint, { ttlMs, inFlightTtlMs, retakeFailed = false }) {
      const at = now()
      if (at - lastSweep >= sweepEveryMs) sweep(at)
      const mapKey = mapKeyOf(scope, key)
      const record = live(mapKey, at)
      const expiresAt = at + Math.max(ttlMs, inFlightTtlMs)
      if (record === undefined) {
        if (records.size >= maxEntries) sweep(at)
        if (records.size >= maxEntries) throw new IdempotencyStoreError('memory idempotency store is full')
        const token = randomUUID()
        records.set(mapKey, { state: 'in-flight', fingerprint, token, until: at + inFlightTtlMs, sending: false, endsAt: null, appointment: null, expiresAt })
        return { kind: 'started', token }
      }
      if (record.fingerprint !== fingerprint) return { kind: 'mismatch' }
      if (record.state === 'done' && !(retakeFailed && record.statusCode !== 200)) {
        return { kind: 'replay', answer: { statusCode: record.statusCode, body: JSON.parse(record.body) }, completedAt: record.completedAt }
      }
      if (record.state === 'in-flight' && record.until > at) return { kind: 'in-flight', retryAfterMs: record.until - at }
      // Taken over: from an owner presumed dead, or from an unknown outcome. A cancel that may have
      // been sent stays so until someone records what became of it: if this owner dies too, or
      // loses its writes, the next one resolves the outcome again.
      const token = randomUUID()
      const sent = record.state === 'unknown' || (record.state === 'in-flight' && record.sending)
      const known = record.state === 'done' ? { endsAt: null, appointment: null } : { endsAt: record.endsAt, appointment: record.appointment }
      records.set(mapKey, { state: 'in-flight', fingerprint, token, until: at + inFlightTtlMs, sending: sent, ...known, expiresAt })
      return sent ? { kind: 'unknown-outcome', token, ...known } : { kind: 'started', token }
    },

    markSending (scope, key, token, holdMs, endsAt = null, appointment = null) {
      const at = now()
      const record = live(mapKeyOf(scope, key), at)
      if (!owned(record, token) || record.until <= at) return false
      record.sending = true
      record.endsAt = endsAt
      record.appointment = appointment
      record.until = Math.max(record.until, at + holdMs)
      record.expiresAt = Math.max(record.expiresAt, record.until)
      return true
    },

    complete (scope, key, token, answer, ttlMs) {
      const at = now()
      const mapKey = mapKeyOf(scope, key)
      const record = live(mapKey, at)
      if (!owned(record, token)) return false
      records.set(mapKey, {
        state: 'done',
        fingerprint: record.fingerprint,
        statusCode: answer.statusCode,
        // Stored as text, as Redis does: a caller mutating its object later changes no replay.
        body: JSON.stringify(answer.body),
        completedAt: at,
        expiresAt: at + ttlMs
      })
      return true
    },

    markUnknown (scope, key, token, ttlMs) {
      const at = now()
      const mapKey = mapKeyOf(scope, key)
      const record = live(mapKey, at)
      if (!owned(record, token)) return false
      records.set(mapKey, { state: 'unknown', fingerprint: record.fingerprint, endsAt: record.endsAt, appointment: record.appointment, expiresAt: at + ttlMs })
      return true
    },

    release (scope, key, token) {
      const mapKey = mapKeyOf(scope, key)
      const record = live(mapKey, now())
      if (!owned(record, token)) return false
      records.delete(mapKey)
      return true
    }
  }
}

// Redis keeps time for every replica (TIME inside the scripts), so that in-flight deadlines do not
// depend on the clocks of the replicas that compare them. Scripts are atomic: two replicas can
// never both own a record. Fields: fp, state (flight | unknown | done), token, until, sending (set
// while in flight once the cancel may have been sent), ends and appt (the appointment's end and its
// listed id, when known, set with sending and kept until the record is done), status, body, at
// (completion time).
const BEGIN = `${LUA_NOW_MS}
local inflight = tonumber(ARGV[4])
local ttl = math.max(tonumber(ARGV[3]), inflight)
local rec = redis.call('HMGET', KEYS[1], 'fp', 'state', 'until', 'status', 'body', 'at', 'sending', 'ends', 'appt')
if not rec[1] then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'state', 'flight', 'token', ARGV[2], 'until', int(now + inflight))
  redis.call('PEXPIRE', KEYS[1], ttl)
  return {'started'}
end
if rec[1] ~= ARGV[1] then return {'mismatch'} end
if rec[2] == 'done' and not (ARGV[5] == '1' and rec[4] ~= '200') then return {'replay', rec[4], rec[5], rec[6]} end
if rec[2] == 'flight' and tonumber(rec[3]) > now then return {'in-flight', tonumber(rec[3]) - now} end
redis.call('HSET', KEYS[1], 'state', 'flight', 'token', ARGV[2], 'until', int(now + inflight))
redis.call('PEXPIRE', KEYS[1], ttl)
-- A failed answer retaken (retakeFailed): nothing was sent for it yet. Its status and body stay
-- unread while the record is in flight, until the new owner's answer replaces them.
if rec[2] == 'done' then return {'started'} end
if rec[2] == 'flight' and not rec[7] then return {'started'} end
-- The cancel may have been sent: so it stays until an owner records the outcome.
redis.call('HSET', KEYS[1], 'sending', '1')
return {'unknown-outcome', rec[8] or '', rec[9] or ''}`

const MARK_SENDING = `local rec = redis.call('HMGET', KEYS[1], 'token', 'until')
if rec[1] ~= ARGV[1] then return 0 end
${LUA_NOW_MS}
if tonumber(rec[2]) <= now then return 0 end
local hold = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'sending', '1', 'until', int(math.max(tonumber(rec[2]), now + hold)))
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], 'ends') else redis.call('HSET', KEYS[1], 'ends', ARGV[3]) end
if ARGV[4] == '' then redis.call('HDEL', KEYS[1], 'appt') else redis.call('HSET', KEYS[1], 'appt', ARGV[4]) end
if redis.call('PTTL', KEYS[1]) < hold then redis.call('PEXPIRE', KEYS[1], hold) end
return 1`

const COMPLETE = `if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
${LUA_NOW_MS}
redis.call('HSET', KEYS[1], 'state', 'done', 'status', ARGV[2], 'body', ARGV[3], 'at', int(now))
redis.call('HDEL', KEYS[1], 'token', 'until', 'sending', 'ends', 'appt')
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1`

const MARK_UNKNOWN = `if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'unknown')
redis.call('HDEL', KEYS[1], 'token', 'until', 'sending')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1`

const RELEASE = `if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1`

const SCRIPTS = {
  begin: redisScript('bffIdempotencyBegin', 1, BEGIN),
  markSending: redisScript('bffIdempotencyMarkSending', 1, MARK_SENDING),
  complete: redisScript('bffIdempotencyComplete', 1, COMPLETE),
  markUnknown: redisScript('bffIdempotencyMarkUnknown', 1, MARK_UNKNOWN),
  release: redisScript('bffIdempotencyRelease', 1, RELEASE)
}

export interface RedisStoreOptions {
  /** The shared client: its command timeout bounds every store call (state/redis.ts). */
  redis: Redis
  prefix?: string
  /** Hears every command that failed or timed out (the shared state's degraded mode). */
  failed?: () => void
}

export function createRedisIdempotencyStore (options: RedisStoreOptions): IdempotencyStore {
  const { redis } = options
  const prefix = options.prefix ?? 'idem:'

  function redisKey (scope: string, key: string): string {
    const { slot, id } = recordId(scope, key)
    return `${prefix}{${slot}}:${id}`
  }

  async function run (script: typeof SCRIPTS.begin, key: string, args: Array<string | number>): Promise<unknown> {
    try {
      coalesceWrites(redis)
      return await script(redis, key, ...args)
    } catch (error) {
      options.failed?.()
      throw new IdempotencyStoreError(isCommandTimeout(error)
        ? 'idempotency store did not answer in time'
        : 'idempotency store failed', { cause: error })
    }
  }

  return {
    async begin (scope, key, fingerprint, { ttlMs, inFlightTtlMs, retakeFailed = false }) {
      const token = randomUUID()
      const reply = await run(SCRIPTS.begin, redisKey(scope, key), [fingerprint, token, Math.ceil(ttlMs), Math.ceil(inFlightTtlMs), retakeFailed ? '1' : '0']) as [string, ...Array<string | number>]
      switch (reply[0]) {
        case 'started': return { kind: 'started', token }
        case 'unknown-outcome': return { kind: 'unknown-outcome', token, endsAt: reply[1] === '' ? null : Number(reply[1]), appointment: reply[2] === '' ? null : String(reply[2]) }
        case 'mismatch': return { kind: 'mismatch' }
        case 'in-flight': return { kind: 'in-flight', retryAfterMs: Number(reply[1]) }
        default: return { kind: 'replay', answer: { statusCode: Number(reply[1]), body: JSON.parse(String(reply[2])) }, completedAt: Number(reply[3]) }
      }
    },

    async complete (scope, key, token, answer, ttlMs) {
      const done = await run(SCRIPTS.complete, redisKey(scope, key), [token, answer.statusCode, JSON.stringify(answer.body), Math.ceil(ttlMs)])
      return done === 1
    },

    async markSending (scope, key, token, holdMs, endsAt = null, appointment = null) {
      return await run(SCRIPTS.markSending, redisKey(scope, key), [token, Math.ceil(holdMs), endsAt === null ? '' : String(endsAt), appointment ?? '']) === 1
    },

    async markUnknown (scope, key, token, ttlMs) {
      return await run(SCRIPTS.markUnknown, redisKey(scope, key), [token, Math.ceil(ttlMs)]) === 1
    },

    async release (scope, key, token) {
      return await run(SCRIPTS.release, redisKey(scope, key), [token]) === 1
    }
  }
}

/**
 * The store for this process: Redis when configured (even while it is unreachable: its failures
 * then become 503s for keyed cancels, never a silent switch to a per-process store that another
 * replica cannot see), memory otherwise.
 */
export function idempotencyStoreFor (sharedState: SharedState): IdempotencyStore {
  if (sharedState.redis === null) return createMemoryIdempotencyStore()
  return createRedisIdempotencyStore({ redis: sharedState.redis, failed: () => { sharedState.degradeFor(FAILED_COMMAND_PAUSE_MS) } })
}
