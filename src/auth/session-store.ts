import { hash, randomBytes } from 'node:crypto'
import { monotonicNow } from '../state/clock.js'
import type { Redis } from 'ioredis'
import { ApiError, ErrorCode } from '../errors.js'
import { coalesceWrites, FAILED_COMMAND_PAUSE_MS, type SharedState } from '../state/redis.js'
import type { Awaitable } from '../state/awaitable.js'
import { LUA_CLOCK_MS, redisScript, type ScriptArg } from '../state/redis-script.js'
import type { Rate } from '../config.js'
import {
  COUNTER_PREFIX,
  LUA_HIT_IN_ORDER,
  createMemoryCounterStore,
  hitsOf,
  limitArgs,
  type CounterHit,
  type MemoryCounterStore
} from '../limits/counter-store.js'

/**
 * Server-side sessions. The client holds an opaque random token; the store holds only its SHA-256
 * (a stolen store dump or a log of keys never yields a usable token) and enforces both lifetimes
 * itself, so a session never outlives its policy even if a Redis TTL is changed by hand.
 */

export type SessionMethod = 'mobile' | 'web'

export interface NewSession {
  email: string
  subject: string
  issuer: string
  method: SessionMethod
  idpSessionId: string | null
  /** Kept only for the web end-session `id_token_hint`; never sent to the client. */
  idToken?: string | null
  /** Mobile: the id (`idTokenId`) of the ID token the session was made from, retired at sign-out. */
  idTokenId?: string | null
}

export interface Session {
  /** sha256(token), base64url: the store key, never the token. */
  id: string
  email: string
  subject: string
  issuer: string
  method: SessionMethod
  idpSessionId: string | null
  idToken: string | null
  idTokenId: string | null
  createdAt: number
  lastSeenAt: number
  absoluteExpiresAt: number
  /** min(idle, absolute) expiry, ms epoch. */
  expiresAt: number
}

/**
 * A per-client limit counted against a session as it is looked up (`RATE_LIMIT_SESSION`,
 * `RATE_LIMIT_CANCEL`). Its counter is `<scope>:{<session id>}` in the per-client counters: the id
 * is the hash tag of the session's own key too, so on Redis the lookup and the counting are one
 * script on one slot.
 */
export interface SessionCounter {
  scope: string
  rate: Rate
}

export interface SessionLookup {
  session: Session | null
  /**
   * One hit on each counter in turn, stopping after the first over its rate (the rule of
   * CounterStore.hitInOrder); none without a live session.
   */
  hits: readonly CounterHit[]
}

export interface SessionStore {
  create: (input: NewSession) => Promise<{ token: string, session: Session }>
  /** Null for a malformed, unknown, revoked or expired token. Slides the idle expiry. */
  get: (token: string) => Awaitable<Session | null>
  /**
   * `get`, and when the session is live, its `counters` counted: one atomic step, on Redis one
   * round trip for the session and its limits (every authenticated request asks). The memory
   * store answers at once. `touch: false` leaves the idle expiry where it is: a request that will
   * be refused (the CSRF check) is no use of the session by its patient.
   */
  lookup: (token: string, counters: readonly SessionCounter[], touch?: boolean) => Awaitable<SessionLookup>
  revoke: (token: string) => Promise<void>
  /** Ends the session whose id (never its token) the caller holds, e.g. `request.session.id`. */
  revokeById: (id: string) => Promise<void>
  /** For OIDC back-channel logout: every session of that subject at that issuer. */
  revokeBySubject: (issuer: string, subject: string) => Promise<number>
  /**
   * Every session of that IdP session at that issuer; with `subject`, only those of that subject
   * (a logout token naming both identifies that subject's session: Back-Channel Logout 1.0, 2.7).
   */
  revokeByIdpSession: (issuer: string, sid: string, subject?: string | null) => Promise<number>
}

export interface SessionStoreOptions {
  idleTtlMs: number
  absoluteTtlMs: number
  /**
   * The clock sessions are judged on (ms epoch). Memory: this process's wall clock by default.
   * Redis: Redis's own clock (TIME) by default, read inside the store's scripts, so that every
   * replica judges a session alike whatever its own clock says; a test's clock replaces it.
   */
  now?: () => number
  /** Redis key prefix. */
  prefix?: string
  /** Memory store: how often expired entries are swept (on the next create). */
  sweepEveryMs?: number
}

/** The counter key of a session's limit (in the per-client counters' key space). */
export function sessionCounterKey (scope: string, id: string): string {
  return `${scope}:{${id}}`
}

const NO_HITS: readonly CounterHit[] = Object.freeze([])
const NO_COUNTERS: readonly SessionCounter[] = Object.freeze([])
/** The lookup of a token that names no live session. */
export const NO_SESSION: SessionLookup = Object.freeze({ session: null, hits: NO_HITS })

/** 32 random bytes in base64url, unpadded: exactly 43 characters of this alphabet. */
const TOKEN_SHAPE = /^[A-Za-z0-9_-]{43}$/

/**
 * The last of the 43 characters carries 4 bits of the token and 2 spare bits, which a canonical
 * encoding leaves at zero: its value is a multiple of 4.
 */
const CANONICAL_LAST = 'AEIMQUYcgkosw048'

export function isWellFormedToken (token: string): boolean {
  // Canonical encoding only: one token, one spelling.
  return TOKEN_SHAPE.test(token) && CANONICAL_LAST.includes(token.charAt(42))
}

export function sessionIdOf (token: string): string {
  return hash('sha256', token, 'base64url')
}

function newToken (): string {
  return randomBytes(32).toString('base64url')
}

/** Index keys name the subject and IdP session by hash: no identifiers of patients in key names. */
function indexKey (issuer: string, value: string): string {
  return hash('sha256', `${issuer}\0${value}`, 'base64url')
}

/** Writes of lastSeenAt are skipped while recent: no store write on every request. */
function touchEveryMs (idleTtlMs: number): number {
  return Math.min(60_000, Math.floor(idleTtlMs / 10))
}

interface SessionRecord extends Omit<Session, 'expiresAt'> {}

/** The session a caller sees: read-only, so that no request can change what the store holds. */
function withExpiry (record: SessionRecord, idleTtlMs: number): Session {
  return Object.freeze({ ...record, expiresAt: Math.min(record.lastSeenAt + idleTtlMs, record.absoluteExpiresAt) })
}

function isLive (record: SessionRecord, idleTtlMs: number, at: number): boolean {
  return at < record.absoluteExpiresAt && at < record.lastSeenAt + idleTtlMs
}

function newRecord (id: string, input: NewSession, at: number, absoluteTtlMs: number): SessionRecord {
  return {
    id,
    email: input.email,
    subject: input.subject,
    issuer: input.issuer,
    method: input.method,
    idpSessionId: input.idpSessionId,
    idToken: input.idToken ?? null,
    idTokenId: input.idTokenId ?? null,
    createdAt: at,
    lastSeenAt: at,
    absoluteExpiresAt: at + absoluteTtlMs
  }
}

/**
 * One process, no Redis. Expired entries are swept lazily on create, so memory stays bounded. It
 * holds each session as callers see it (frozen, expiry included), made anew only when the idle
 * expiry slides: a lookup returns it as it is. Its sessions' limits are counted in counters of its
 * own, which nothing else counts.
 */
export class MemorySessionStore implements SessionStore {
  readonly #sessions = new Map<string, Session>()
  readonly #bySubject = new Map<string, Set<string>>()
  readonly #byIdpSession = new Map<string, Set<string>>()
  readonly #idleTtlMs: number
  readonly #absoluteTtlMs: number
  readonly #now: () => number
  readonly #sweepEveryMs: number
  readonly #counters: MemoryCounterStore
  #lastSweep: number

  constructor (options: SessionStoreOptions) {
    this.#idleTtlMs = options.idleTtlMs
    this.#absoluteTtlMs = options.absoluteTtlMs
    this.#now = options.now ?? Date.now
    this.#sweepEveryMs = options.sweepEveryMs ?? 60_000
    // The per-session limits on the monotonic clock, as every memory limit (unless a test drives
    // the clock): a wall clock stepped back would stretch their windows. Session lifetimes stay
    // on the wall clock, which `expiresAt` is read on.
    this.#counters = createMemoryCounterStore({ now: options.now ?? monotonicNow })
    this.#lastSweep = this.#now()
  }

  /** How many sessions are held, expired or not (tests check that sweeping bounds it). */
  get size (): number {
    return this.#sessions.size
  }

  async create (input: NewSession): Promise<{ token: string, session: Session }> {
    const at = this.#now()
    if (at - this.#lastSweep >= this.#sweepEveryMs) this.sweep()
    const token = newToken()
    const record = newRecord(sessionIdOf(token), input, at, this.#absoluteTtlMs)
    const session = withExpiry(record, this.#idleTtlMs)
    this.#sessions.set(record.id, session)
    addToIndex(this.#bySubject, indexKey(record.issuer, record.subject), record.id)
    if (record.idpSessionId !== null) addToIndex(this.#byIdpSession, indexKey(record.issuer, record.idpSessionId), record.id)
    return { token, session }
  }

  get (token: string, touch = true): Session | null {
    if (!isWellFormedToken(token)) return null
    const session = this.#sessions.get(sessionIdOf(token))
    if (session === undefined) return null
    const at = this.#now()
    if (!isLive(session, this.#idleTtlMs, at)) {
      this.#delete(session.id)
      return null
    }
    if (!touch || at - session.lastSeenAt < touchEveryMs(this.#idleTtlMs)) return session
    const touched = withExpiry({ ...session, lastSeenAt: at }, this.#idleTtlMs)
    this.#sessions.set(session.id, touched)
    return touched
  }

  lookup (token: string, counters: readonly SessionCounter[], touch = true): SessionLookup {
    const session = this.get(token, touch)
    if (session === null) return NO_SESSION
    if (counters.length === 0) return { session, hits: NO_HITS }
    const requests = counters.map(({ scope, rate }) => ({ key: sessionCounterKey(scope, session.id), rate }))
    return { session, hits: this.#counters.hitInOrder(requests) }
  }

  async revoke (token: string): Promise<void> {
    if (isWellFormedToken(token)) this.#delete(sessionIdOf(token))
  }

  async revokeById (id: string): Promise<void> {
    this.#delete(id)
  }

  async revokeBySubject (issuer: string, subject: string): Promise<number> {
    return this.#revokeIndexed(this.#bySubject, indexKey(issuer, subject))
  }

  async revokeByIdpSession (issuer: string, sid: string, subject: string | null = null): Promise<number> {
    return this.#revokeIndexed(this.#byIdpSession, indexKey(issuer, sid), subject)
  }

  /** Drops every expired session. */
  sweep (): void {
    const at = this.#now()
    this.#lastSweep = at
    for (const record of this.#sessions.values()) {
      if (!isLive(record, this.#idleTtlMs, at)) this.#delete(record.id)
    }
  }

  #revokeIndexed (index: Map<string, Set<string>>, key: string, subject: string | null = null): number {
    const ids = index.get(key)
    if (ids === undefined) return 0
    const at = this.#now()
    let count = 0
    for (const id of [...ids]) {
      const record = this.#sessions.get(id)
      // Only that subject's, when named: the others keep their sessions and their index entries.
      if (subject !== null && record?.subject !== subject) continue
      if (record !== undefined && isLive(record, this.#idleTtlMs, at)) count++
      this.#delete(id)
    }
    return count
  }

  #delete (id: string): void {
    const record = this.#sessions.get(id)
    if (record === undefined) return
    this.#sessions.delete(id)
    removeFromIndex(this.#bySubject, indexKey(record.issuer, record.subject), id)
    if (record.idpSessionId !== null) removeFromIndex(this.#byIdpSession, indexKey(record.issuer, record.idpSessionId), id)
  }
}

function addToIndex (index: Map<string, Set<string>>, key: string, id: string): void {
  const ids = index.get(key)
  if (ids === undefined) index.set(key, new Set([id]))
  else ids.add(id)
}

function removeFromIndex (index: Map<string, Set<string>>, key: string, id: string): void {
  // Every held session is in its indexes (added on create, removed only here).
  const ids = index.get(key) as Set<string>
  ids.delete(id)
  if (ids.size === 0) index.delete(key)
}

// The creation of a session in RedisSessionStore, on the store's clock (LUA_CLOCK_MS). KEYS[1]:
// the session's hash; KEYS[2..]: its indexes. ARGV[1]: the clock ('' for Redis's); ARGV[2]: the
// idle lifetime (ms); ARGV[3]: the absolute lifetime (ms); ARGV[4]: the session's id; ARGV[5..]:
// its other fields, name and value. Each index gets the id scored by its absolute expiry, loses
// the ids whose sessions can no longer exist, and lives as long as the longest-lived can. Answers the
// creation's time.
const createScript = redisScript('bffSessionCreate', 'variable', `${LUA_CLOCK_MS}
local at = clock_ms(ARGV[1])
local idle, absolute = tonumber(ARGV[2]), tonumber(ARGV[3])
local ends = int(at + absolute)
local fields = {'createdAt', int(at), 'lastSeenAt', int(at), 'absoluteExpiresAt', ends}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('PEXPIRE', KEYS[1], int(math.min(idle, absolute)))
for i = 2, #KEYS do
  redis.call('ZADD', KEYS[i], ends, ARGV[4])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', int(at))
  -- Only ever longer: a session made under a longer absolute lifetime (before a deploy lowered
  -- it, or on a replica not yet on the new value) stays findable for as long as it can live.
  if redis.call('PTTL', KEYS[i]) < absolute then redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
end
return int(at)
`)

// The lookup of RedisSessionStore, atomic so that no touch can race a revoke on another replica
// (a plain HSET after a DEL would recreate a half session). KEYS[1]: the session's hash; KEYS[2..]:
// its counters. ARGV[1]: the clock ('' for Redis's, see LUA_CLOCK_MS); ARGV[2]: the idle lifetime
// (ms); ARGV[3]: how long ago it must have been seen to slide its expiry (ms); ARGV[4..]: each
// counter's window and limit. Answers {} when there is no live session, else its fields (as
// HGETALL) and the counters' hits, counted only then.
const lookupScript = redisScript('bffSessionLookup', 'variable', `${LUA_CLOCK_MS}${LUA_HIT_IN_ORDER}
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return {} end
local record = {}
for i = 1, #fields, 2 do record[fields[i]] = fields[i + 1] end
local at, idle = clock_ms(ARGV[1]), tonumber(ARGV[2])
local seen, ends = tonumber(record.lastSeenAt), tonumber(record.absoluteExpiresAt)
-- A damaged hash is no session (the caller's decode refuses other damage).
if seen == nil or ends == nil then return {} end
-- isLive(), as the memory store decides it.
if at >= ends or at >= seen + idle then
  redis.call('DEL', KEYS[1])
  return {}
end
if at - seen >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'lastSeenAt', int(at))
  redis.call('PEXPIRE', KEYS[1], int(math.min(idle, ends - at)))
  for i = 1, #fields, 2 do
    if fields[i] == 'lastSeenAt' then fields[i + 1] = int(at) end
  end
end
return {fields, hit_in_order({unpack(KEYS, 2)}, {unpack(ARGV, 4)})}
`)

type IndexKind = 'sub' | 'sid'

/**
 * Shared by every replica, and judged on Redis's clock (TIME, read by the create and lookup
 * scripts): a replica whose own clock is off neither ends sessions early for every replica nor
 * stretches them. A hash per session (`<prefix>s:{<id>}`), with indexes by subject and
 * by IdP session (`<prefix>idx:sub:<hash>`, `<prefix>idx:sid:<hash>`) for back-channel logout:
 * sorted sets of session ids scored by each session's absolute expiry. Every key carries a
 * PEXPIRE so that Redis cleans up after us. An index lives as long as its newest member can, a
 * sign-out takes its session out, and each sign-in prunes the members whose sessions can no longer
 * exist by their absolute expiry, so an index holds at most
 * the sessions of one absolute lifetime, even for a patient who signs in every day. (Until
 * 2026-12, plain sets under `sub:`/`sid:` that nothing pruned: a patient signing in again within
 * each absolute lifetime kept every id ever created. They are no longer written, still read by a
 * back-channel logout, and expire by themselves. During a rolling upgrade, a replica still on the
 * old version does not see the sessions the new ones indexed.)
 */
export class RedisSessionStore implements SessionStore {
  readonly #redis: Redis
  readonly #failed: (() => void) | undefined
  readonly #idleTtlMs: number
  readonly #absoluteTtlMs: number
  /** The test's clock, or '' for Redis's own (the scripts read TIME). */
  readonly #clock: () => number | ''
  readonly #prefix: string

  /** `failed`: hears every command that failed or timed out (the shared state's degraded mode). */
  constructor (redis: Redis, options: SessionStoreOptions, failed?: () => void) {
    this.#redis = redis
    this.#failed = failed
    this.#idleTtlMs = options.idleTtlMs
    this.#absoluteTtlMs = options.absoluteTtlMs
    this.#clock = options.now ?? redisClock
    this.#prefix = options.prefix ?? 'bff:session:'
  }

  async create (input: NewSession): Promise<{ token: string, session: Session }> {
    const token = newToken()
    const id = sessionIdOf(token)
    const keys = [this.#sessionKey(id), this.#index('sub', indexKey(input.issuer, input.subject))]
    if (input.idpSessionId !== null) keys.push(this.#index('sid', indexKey(input.issuer, input.idpSessionId)))
    const args: ScriptArg[] = [keys.length, ...keys, this.#clock(), this.#idleTtlMs, this.#absoluteTtlMs, id]
    for (const [name, value] of Object.entries(identityFields(input))) args.push(name, value)
    const at = await this.#run(async () => Number(await createScript(this.#redis, ...args)))
    return { token, session: withExpiry(newRecord(id, input, at, this.#absoluteTtlMs), this.#idleTtlMs) }
  }

  async get (token: string): Promise<Session | null> {
    return (await this.lookup(token, NO_COUNTERS)).session
  }

  lookup (token: string, counters: readonly SessionCounter[], touch = true): Awaitable<SessionLookup> {
    if (!isWellFormedToken(token)) return NO_SESSION
    const id = sessionIdOf(token)
    const args: ScriptArg[] = [1 + counters.length, this.#sessionKey(id)]
    for (const { scope } of counters) args.push(COUNTER_PREFIX + sessionCounterKey(scope, id))
    // Untouched: a live session was seen less than its idle lifetime ago, never that long.
    args.push(this.#clock(), this.#idleTtlMs, touch ? touchEveryMs(this.#idleTtlMs) : this.#idleTtlMs)
    limitArgs(counters, args)
    return this.#run(async () => lookedUp(id, await lookupScript(this.#redis, ...args), counters.length, this.#idleTtlMs))
  }

  async revoke (token: string): Promise<void> {
    if (isWellFormedToken(token)) await this.revokeById(sessionIdOf(token))
  }

  async revokeById (id: string): Promise<void> {
    const key = this.#sessionKey(id)
    // Out of its indexes too, as the memory store does (a patient signing in and out all day
    // would otherwise leave every ended id there until its absolute expiry, for a back-channel
    // logout to read): they are named by its fields, read first. One that is gone already (past
    // its idle lifetime) leaves its entries to the next sign-in's pruning.
    const [issuer, subject, sid] = await this.#run(() => this.#redis.hmget(key, 'issuer', 'subject', 'idpSessionId')) as [string | null, string | null, string | null]
    const multi = this.#redis.multi().del(key)
    if (issuer !== null && subject !== null) multi.zrem(this.#index('sub', indexKey(issuer, subject)), id)
    if (issuer !== null && sid !== null) multi.zrem(this.#index('sid', indexKey(issuer, sid)), id)
    await this.#run(async () => checkMulti(await multi.exec()))
  }

  async revokeBySubject (issuer: string, subject: string): Promise<number> {
    return this.#revokeIndexed('sub', indexKey(issuer, subject))
  }

  async revokeByIdpSession (issuer: string, sid: string, subject: string | null = null): Promise<number> {
    return this.#revokeIndexed('sid', indexKey(issuer, sid), subject)
  }

  async #revokeIndexed (kind: IndexKind, hashed: string, subject: string | null = null): Promise<number> {
    const index = this.#index(kind, hashed)
    // The set the same index was before sorted sets (no longer written): its sessions may live
    // for one more absolute lifetime after an upgrade, and must still end.
    const legacy = `${this.#prefix}${kind}:${hashed}`
    // Every indexed session (those that can no longer exist are gone already, their DEL a no-op
    // and their entries leaving with the rest: no replica's clock decides), and the legacy set's.
    let [current, old] = await this.#run(async () => checkMulti(await this.#redis.multi()
      .zrange(index, 0, -1)
      .smembers(legacy)
      .exec())) as [string[], string[]]
    let ids = [...new Set([...current, ...old])]
    if (subject !== null && ids.length > 0) {
      // Only that subject's: the others keep their sessions and their index entries. A session
      // already gone (no subject to read) leaves its entries with the rest.
      const subjects = await this.#run(async () => checkMulti(await ids.reduce((multi, id) => multi.hget(this.#sessionKey(id), 'subject'), this.#redis.multi()).exec())) as Array<string | null>
      const named = new Set(ids.filter((_id, i) => subjects[i] === null || subjects[i] === subject))
      ids = [...named]
      current = current.filter((id) => named.has(id))
      old = old.filter((id) => named.has(id))
    }
    if (ids.length === 0) return 0
    // ZREM of exactly the members read, not DEL of the index: a session created meanwhile keeps
    // its index entry and stays revocable.
    const multi = this.#redis.multi().del(...ids.map((id) => this.#sessionKey(id)))
    if (current.length > 0) multi.zrem(index, ...current)
    if (old.length > 0) multi.srem(legacy, ...old)
    const results = await this.#run(async () => checkMulti(await multi.exec()))
    return Number(results[0])
  }

  /** The index of the sessions of one subject (`sub`) or one IdP session (`sid`), by `indexKey`. */
  #index (kind: IndexKind, hashed: string): string {
    return `${this.#prefix}idx:${kind}:${hashed}`
  }

  /** The id is the key's hash tag, as in its counters' keys (sessionCounterKey). */
  #sessionKey (id: string): string {
    return `${this.#prefix}s:{${id}}`
  }

  /**
   * Any Redis failure is a 503, never a fallback to memory: a session created or revoked in one
   * process's memory would be unknown to the other replicas (sign-outs that do not hold, sign-ins
   * that work only on one replica), which is worse than a short, honest outage. The client is
   * built with a command timeout and no offline queue, so a failure arrives fast.
   */
  async #run<T> (operation: () => Promise<T>): Promise<T> {
    try {
      coalesceWrites(this.#redis)
      return await operation()
    } catch (error) {
      this.#failed?.()
      throw sessionStoreUnavailable(error)
    }
  }
}

/** The lookup script's answer as a lookup: the session only when its fields decode. */
function lookedUp (id: string, reply: unknown, counters: number, idleTtlMs: number): SessionLookup {
  if (!Array.isArray(reply) || reply.length === 0) return NO_SESSION
  const [list, hits] = reply as [string[], unknown]
  const fields: Record<string, string> = {}
  for (let i = 0; i < list.length; i += 2) fields[list[i] as string] = list[i + 1] as string
  const record = decode(id, fields)
  if (record === null) return NO_SESSION
  return { session: withExpiry(record, idleTtlMs), hits: counters === 0 ? NO_HITS : hitsOf(hits, counters) }
}

export function sessionStoreUnavailable (cause: unknown): ApiError {
  return new ApiError(503, ErrorCode.SERVICE_UNAVAILABLE, 'Session store unavailable', { cause, headers: { 'retry-after': '1' } })
}

/**
 * One Redis command of the stores beside the sessions (the replay guard, the logout marks): as a
 * session command's (RedisSessionStore's #run), a failure makes the shared state degraded for its
 * pause and is an honest 503, never a per-process answer other replicas lack.
 */
export async function sessionCommand<T> (sharedState: Partial<Pick<SharedState, 'degradeFor'>>, command: () => Promise<T>): Promise<T> {
  try {
    return await command()
  } catch (error) {
    sharedState.degradeFor?.(FAILED_COMMAND_PAUSE_MS)
    throw sessionStoreUnavailable(error)
  }
}

type MultiResult = Array<[Error | null, unknown]> | null

function checkMulti (results: MultiResult): unknown[] {
  /* c8 ignore next -- exec() answers null only when a WATCHed key changed; nothing is watched */
  if (results === null) throw new Error('transaction aborted')
  return results.map(([error, value]) => {
    /* c8 ignore next -- per-command errors need a wrong-type key, which only this store writes */
    if (error !== null) throw error
    return value
  })
}

/** A session's hash fields but its times (the create script writes those on its clock). */
function identityFields (input: NewSession): Record<string, string> {
  const fields: Record<string, string> = {
    email: input.email,
    subject: input.subject,
    issuer: input.issuer,
    method: input.method
  }
  // Absent fields are left out: an empty string could be a real value.
  if (input.idpSessionId !== null) fields.idpSessionId = input.idpSessionId
  if (input.idToken != null) fields.idToken = input.idToken
  if (input.idTokenId != null) fields.idTokenId = input.idTokenId
  return fields
}

/** The clock argument that makes a script read Redis's own (LUA_CLOCK_MS). */
function redisClock (): '' {
  return ''
}

/** Null unless every required field is there and well-typed (a partial hash is no session). */
function decode (id: string, fields: Record<string, string>): SessionRecord | null {
  const { email, subject, issuer, method } = fields
  const createdAt = Number(fields.createdAt)
  const lastSeenAt = Number(fields.lastSeenAt)
  const absoluteExpiresAt = Number(fields.absoluteExpiresAt)
  if (email === undefined || subject === undefined || issuer === undefined) return null
  if (method !== 'mobile' && method !== 'web') return null
  if (![createdAt, lastSeenAt, absoluteExpiresAt].every(Number.isFinite)) return null
  return {
    id,
    email,
    subject,
    issuer,
    method,
    idpSessionId: fields.idpSessionId ?? null,
    idToken: fields.idToken ?? null,
    idTokenId: fields.idTokenId ?? null,
    createdAt,
    lastSeenAt,
    absoluteExpiresAt
  }
}

/**
 * Redis when the service has one, memory otherwise. With Redis configured but down, the Redis
 * store answers 503 (see RedisSessionStore#run) rather than switching to memory.
 */
export function createSessionStore (sharedState: Pick<SharedState, 'redis' | 'degradeFor'>, options: SessionStoreOptions): SessionStore {
  return sharedState.redis === null
    ? new MemorySessionStore(options)
    : new RedisSessionStore(sharedState.redis, options, () => { sharedState.degradeFor(FAILED_COMMAND_PAUSE_MS) })
}
