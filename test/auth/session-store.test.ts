import t, { type Test } from 'tap'
import { createHash } from 'node:crypto'
import { pino } from 'pino'
import { Redis } from 'ioredis'
import { ApiError } from '../../src/errors.js'
import { createSharedState, type SharedState } from '../../src/state/redis.js'
import {
  MemorySessionStore,
  RedisSessionStore,
  createSessionStore,
  isWellFormedToken,
  sessionIdOf,
  type NewSession,
  type SessionStore
} from '../../src/auth/session-store.js'
import { createUnlessLoggedOut } from '../../src/auth/sign-in.js'
import { startRedis, redisClient } from '../helpers/redis.js'

const MIN = 60_000
const IDLE = 30 * MIN
const ABSOLUTE = 2 * 60 * MIN
const START = 1_700_000_000_000

const silent = pino({ level: 'silent' })

const patient = (overrides: Partial<NewSession> = {}): NewSession => ({
  email: 'patient@example.com',
  subject: 'subject-1',
  issuer: 'https://idp.example',
  method: 'mobile',
  idpSessionId: null,
  ...overrides
})

interface Harness {
  store: SessionStore
  clock: { at: number }
  /** Every key and value the store holds, flattened (Redis only). */
  dump?: () => Promise<string[]>
  redis?: Redis
}

async function connected (sharedState: SharedState): Promise<Redis> {
  const redis = sharedState.redis as Redis
  while (sharedState.mode() !== 'redis') await new Promise((resolve) => setTimeout(resolve, 5))
  return redis
}

async function dumpRedis (redis: Redis): Promise<string[]> {
  const out: string[] = []
  for (const key of await redis.keys('*')) {
    out.push(key)
    const type = await redis.type(key)
    if (type === 'hash') out.push(...Object.entries(await redis.hgetall(key)).flat())
    else if (type === 'set') out.push(...await redis.smembers(key))
    else if (type === 'zset') out.push(...await redis.zrange(key, 0, -1))
    else out.push(String(await redis.get(key)))
  }
  return out
}

const redisServer = await startRedis(t)

interface Lifetimes { idleTtlMs: number, absoluteTtlMs: number }
const LIFETIMES: Lifetimes = { idleTtlMs: IDLE, absoluteTtlMs: ABSOLUTE }

const kinds: Array<{ name: string, make: (t: Test, lifetimes?: Lifetimes) => Promise<Harness> }> = [
  {
    name: 'memory',
    make: async (_t, lifetimes = LIFETIMES) => {
      const clock = { at: START }
      return { store: createSessionStore({ redis: null, degradeFor () {} }, { ...lifetimes, now: () => clock.at }), clock }
    }
  },
  {
    name: 'redis',
    make: async (t, lifetimes = LIFETIMES) => {
      await redisServer.flush()
      const sharedState = createSharedState({ url: redisServer.url, log: silent })
      t.teardown(() => sharedState.close())
      const redis = await connected(sharedState)
      const clock = { at: START }
      const store = createSessionStore(sharedState, { ...lifetimes, now: () => clock.at })
      return { store, clock, redis, dump: () => dumpRedis(redis) }
    }
  }
]

for (const kind of kinds) {
  t.test(`${kind.name} store`, async (t) => {
    t.test('create then get', async (t) => {
      const { store } = await kind.make(t)
      const { token, session } = await store.create(patient({ idpSessionId: 'sid-1' }))
      t.match(token, /^[A-Za-z0-9_-]{43}$/)
      t.ok(isWellFormedToken(token))
      t.equal(session.id, createHash('sha256').update(token).digest('base64url'))
      t.equal(session.id, sessionIdOf(token))
      t.not(session.id, token)
      t.same(session, {
        id: session.id,
        email: 'patient@example.com',
        subject: 'subject-1',
        issuer: 'https://idp.example',
        method: 'mobile',
        idpSessionId: 'sid-1',
        idToken: null,
        idTokenId: null,
        createdAt: START,
        lastSeenAt: START,
        absoluteExpiresAt: START + ABSOLUTE,
        expiresAt: START + IDLE
      })
      t.same(await store.get(token), session)
      const other = await store.create(patient())
      t.not(other.token, token, 'every token is new')
      t.equal((await store.get(other.token))?.idpSessionId, null)
    })

    t.test('a sign-in\'s session outlives its second look at the logout marks only when that look finds none', async (t) => {
      const { store } = await kind.make(t)
      const signIn = { issuer: 'https://idp.example', subject: 'subject-1', sid: null, authTime: START / 1000 }
      const looks = (answer: () => Promise<boolean>) => ({ loggedOut: answer })
      const kept = await createUnlessLoggedOut(store, looks(async () => false), signIn, patient())
      t.ok(kept !== null && await store.get(kept.token) !== null, 'no logout: the session is live')
      t.equal(await store.revokeBySubject('https://idp.example', 'subject-1'), 1)
      t.equal(await createUnlessLoggedOut(store, looks(async () => true), signIn, patient()), null, 'logged out meanwhile: refused')
      t.equal(await store.revokeBySubject('https://idp.example', 'subject-1'), 0, 'and its session ended')
      // The look itself fails (the logout marks on a Redis that stopped answering): the sign-in
      // fails with that error, its token never sent, and the session it made is not left stored.
      const unreachable = new ApiError(503, 'SERVICE_UNAVAILABLE', 'Session store unavailable')
      await t.rejects(createUnlessLoggedOut(store, looks(async () => { throw unreachable }), signIn, patient()), unreachable)
      t.equal(await store.revokeBySubject('https://idp.example', 'subject-1'), 0, 'no session left behind by the failed look')
      // The store fails to end it too: the look's error is the sign-in's, not the store's.
      const failing = { create: async (input: NewSession) => await store.create(input), revokeById: async () => { throw new Error('store unreachable too') } }
      await t.rejects(createUnlessLoggedOut(failing, looks(async () => { throw unreachable }), signIn, patient()), unreachable)
    })

    t.test('keeps the id of a mobile session\'s ID token, to retire it at sign-out', async (t) => {
      const { store } = await kind.make(t)
      const { token } = await store.create(patient({ idTokenId: 'id-of-the-id-token' }))
      t.equal((await store.get(token))?.idTokenId, 'id-of-the-id-token')
    })

    t.test('keeps a web id_token for the end-session hint', async (t) => {
      const { store } = await kind.make(t)
      const { token } = await store.create(patient({ method: 'web', idToken: 'header.payload.signature' }))
      const session = await store.get(token)
      t.equal(session?.method, 'web')
      t.equal(session?.idToken, 'header.payload.signature')
    })

    t.test('the token is never stored in clear', async (t) => {
      const { store, dump, redis } = await kind.make(t)
      const { token } = await store.create(patient({ idpSessionId: 'sid-1' }))
      t.equal((await store.get(token))?.id, sessionIdOf(token), 'the session is keyed by the hash')
      // The memory store's map is private; its key is the id checked above.
      if (dump === undefined || redis === undefined) return
      const everything = await dump()
      t.ok(everything.length > 0)
      for (const item of everything) t.notOk(item.includes(token), 'no key or value holds the token')
      const keys = await redis.keys('*')
      t.ok(keys.some((key) => key.endsWith(`{${sessionIdOf(token)}}`)), 'the hash is the key (and its hash tag)')
      t.notOk(keys.some((key) => key.includes('subject-1') || key.includes('sid-1') || key.includes('patient@')), 'no identifiers in key names')
    })

    t.test('idle expiry', async (t) => {
      const { store, clock } = await kind.make(t)
      const { token } = await store.create(patient())
      clock.at += IDLE
      t.equal(await store.get(token), null, 'dead at exactly the idle limit')
      clock.at -= 1
      t.equal(await store.get(token), null, 'and stays dead once found expired')
    })

    t.test('idle expiry slides with use, at most one write per interval', async (t) => {
      const { store, clock, redis } = await kind.make(t)
      const { token, session } = await store.create(patient())
      clock.at += 30_000
      const early = await store.get(token)
      t.equal(early?.lastSeenAt, START, 'no touch within a minute')
      t.equal(early?.expiresAt, START + IDLE)
      clock.at = START + IDLE - MIN
      const touched = await store.get(token)
      t.equal(touched?.lastSeenAt, clock.at)
      t.equal(touched?.expiresAt, clock.at + IDLE)
      if (redis !== undefined) {
        const key = `bff:session:s:{${session.id}}`
        t.equal(await redis.hget(key, 'lastSeenAt'), String(clock.at))
        const ttl = await redis.pttl(key)
        t.ok(ttl > IDLE - 5000 && ttl <= IDLE, 'PEXPIRE slides too')
      }
      clock.at += IDLE - MIN
      t.ok(await store.get(token), 'alive well past the first idle limit')
    })

    t.test('a lookup that must not touch (a request the CSRF check refuses) never slides the idle expiry', async (t) => {
      const { store, clock } = await kind.make(t)
      const { token } = await store.create(patient())
      clock.at = START + IDLE - 1
      const found = await store.lookup(token, [], false)
      t.equal(found.session?.lastSeenAt, START, 'seen a millisecond before its idle limit: not touched')
      clock.at = START + IDLE
      t.equal(await store.get(token), null, 'dead at the idle limit, as if never looked up')
    })

    t.test('a lookup touches by default (every authenticated request does)', async (t) => {
      const { store, clock } = await kind.make(t)
      const { token } = await store.create(patient())
      clock.at = START + IDLE - 1
      t.equal((await store.lookup(token, [])).session?.lastSeenAt, START + IDLE - 1, 'touched')
      clock.at = START + IDLE
      t.ok(await store.get(token), 'alive at the first idle limit')
    })

    t.test('the idle expiry slides once a tenth of the idle lifetime has passed', async (t) => {
      const idle = 2 * MIN
      const { store, clock } = await kind.make(t, { idleTtlMs: idle, absoluteTtlMs: ABSOLUTE })
      const { token } = await store.create(patient())
      clock.at = START + 11_000
      t.equal((await store.get(token))?.expiresAt, START + idle, 'not within a tenth (12 s)')
      clock.at = START + 20_000
      const touched = await store.get(token)
      t.equal(touched?.lastSeenAt, START + 20_000)
      t.equal(touched?.expiresAt, START + 20_000 + idle, 'two minutes from this lookup')
      clock.at = START + 31_999
      t.equal((await store.get(token))?.lastSeenAt, START + 20_000, 'not a millisecond before a tenth has passed again')
      clock.at = START + 32_000
      t.equal((await store.get(token))?.lastSeenAt, START + 32_000, 'exactly a tenth after the last touch: touched')
    })

    t.test('absolute expiry despite activity', async (t) => {
      const { store, clock } = await kind.make(t)
      const { token } = await store.create(patient())
      while (clock.at + 20 * MIN < START + ABSOLUTE) {
        clock.at += 20 * MIN
        const session = await store.get(token)
        t.ok(session)
        t.equal(session?.expiresAt, Math.min(clock.at + IDLE, START + ABSOLUTE), 'expiresAt is the earlier limit')
      }
      clock.at = START + ABSOLUTE
      t.equal(await store.get(token), null)
    })

    t.test('revoke', async (t) => {
      const { store } = await kind.make(t)
      const first = await store.create(patient())
      const second = await store.create(patient())
      await store.revoke(first.token)
      t.equal(await store.get(first.token), null)
      t.ok(await store.get(second.token), 'other sessions of the patient stay')
      await store.revokeById(second.session.id)
      t.equal(await store.get(second.token), null)
      await store.revoke('not a token')
      await store.revoke(first.token)
      t.pass('revoking twice or junk is harmless')
    })

    t.test('revokeBySubject', async (t) => {
      const { store } = await kind.make(t)
      const a = await store.create(patient({ idpSessionId: 'sid-a' }))
      const b = await store.create(patient())
      const otherPatient = await store.create(patient({ subject: 'subject-2', email: 'other@example.com' }))
      const otherIssuer = await store.create(patient({ issuer: 'https://other.example' }))
      t.equal(await store.revokeBySubject('https://idp.example', 'subject-1'), 2)
      t.equal(await store.get(a.token), null)
      t.equal(await store.get(b.token), null)
      t.ok(await store.get(otherPatient.token))
      t.ok(await store.get(otherIssuer.token), 'the same subject at another issuer is someone else')
      t.equal(await store.revokeBySubject('https://idp.example', 'subject-1'), 0)
      t.equal(await store.revokeBySubject('https://idp.example', 'nobody'), 0)
      const later = await store.create(patient())
      t.ok(await store.get(later.token), 'a new sign-in after the logout works')
      t.equal(await store.revokeBySubject('https://idp.example', 'subject-1'), 1, 'and is indexed again')
    })

    t.test('revokeByIdpSession', async (t) => {
      const { store } = await kind.make(t)
      const a = await store.create(patient({ idpSessionId: 'sid-1' }))
      const b = await store.create(patient({ idpSessionId: 'sid-1', method: 'web' }))
      const c = await store.create(patient({ idpSessionId: 'sid-2' }))
      const d = await store.create(patient())
      t.equal(await store.revokeByIdpSession('https://idp.example', 'sid-1'), 2)
      t.equal(await store.get(a.token), null)
      t.equal(await store.get(b.token), null)
      t.ok(await store.get(c.token))
      t.ok(await store.get(d.token))
      t.equal(await store.revokeByIdpSession('https://other.example', 'sid-2'), 0)
      t.equal(await store.revokeByIdpSession('https://idp.example', 'sid-1'), 0)
    })

    t.test('revokeByIdpSession with a subject: that subject\'s sessions of the sid only', async (t) => {
      const { store, clock } = await kind.make(t)
      const gone = await store.create(patient({ idpSessionId: 'sid-1' }))
      clock.at += IDLE
      t.equal(await store.get(gone.token), null, 'one past its idle lifetime, still in the index')
      const mine = await store.create(patient({ idpSessionId: 'sid-1' }))
      const other = await store.create(patient({ idpSessionId: 'sid-1', subject: 'subject-2' }))
      t.equal(await store.revokeByIdpSession('https://idp.example', 'sid-1', 'subject-2'), 1)
      t.equal(await store.get(other.token), null)
      t.ok(await store.get(mine.token), 'another subject under the same sid is not named')
      t.equal(await store.revokeByIdpSession('https://idp.example', 'sid-1', 'subject-3'), 0, 'nobody of that subject')
      t.ok(await store.get(mine.token))
      t.equal(await store.revokeByIdpSession('https://idp.example', 'sid-1'), 1, 'still indexed: the sid alone ends it')
      t.equal(await store.get(mine.token), null)
    })

    t.test('lookup counts the session\'s limits in order, stopping at the first over its rate', async (t) => {
      const { store, redis } = await kind.make(t)
      const { token, session } = await store.create(patient())
      const perSession = { scope: 'session', rate: { count: 2, windowMs: MIN } }
      const perCancel = { scope: 'cancel', rate: { count: 5, windowMs: 30_000 } }
      const first = await store.lookup(token, [perSession, perCancel])
      t.same(first.session, session, 'the session, as get finds it')
      t.same(first.hits.map((hit) => hit.count), [1, 1])
      t.ok((first.hits[0]?.resetMs ?? 0) > 30_000 && (first.hits[0]?.resetMs ?? 0) <= MIN, 'the session window')
      t.ok((first.hits[1]?.resetMs ?? 0) > 0 && (first.hits[1]?.resetMs ?? 0) <= 30_000, 'the cancel window, its own')
      t.same((await store.lookup(token, [perSession])).hits.map((hit) => hit.count), [2], 'only the counters asked for')
      const refused = await store.lookup(token, [perSession, perCancel])
      t.same(refused.hits.map((hit) => hit.count), [3], 'over the session rate: the cancel counter is not counted')
      t.same(refused.session, session, 'an exceeded limit is the caller\'s to refuse; the session is still found')
      t.same(await store.lookup(token, []), { session, hits: [] }, 'no counters: a plain lookup')
      const other = await store.create(patient())
      t.same((await store.lookup(other.token, [perCancel, perSession])).hits.map((hit) => hit.count), [1, 1], 'each session counts apart')
      if (redis !== undefined) {
        t.equal(await redis.get(`bff:limit:session:{${session.id}}`), '3', 'in the per-client counters, the session id as hash tag')
        t.equal(await redis.get(`bff:limit:cancel:{${session.id}}`), '1')
      }
    })

    t.test('lookup counts nothing without a live session', async (t) => {
      const { store, clock, redis } = await kind.make(t)
      const rate = { count: 5, windowMs: MIN }
      const counters = [{ scope: 'session', rate }, { scope: 'cancel', rate }]
      const revoked = await store.create(patient())
      await store.revoke(revoked.token)
      const expired = await store.create(patient())
      clock.at += IDLE
      for (const token of [revoked.token, expired.token, 'not a token', 'A'.repeat(43)]) {
        t.same(await store.lookup(token, counters), { session: null, hits: [] })
      }
      const live = await store.create(patient())
      t.same((await store.lookup(live.token, counters)).hits.map((hit) => hit.count), [1, 1])
      if (redis !== undefined) t.same((await redis.keys('bff:limit:*')).length, 2, 'only the live session\'s counters exist')
    })

    t.test('malformed tokens are refused', async (t) => {
      const { store } = await kind.make(t)
      const { token } = await store.create(patient())
      const malformed = [
        '',
        token.slice(1),
        `${token}A`,
        `${token.slice(0, 42)}+`,
        `${token.slice(0, 42)}=`,
        `${token.slice(0, 20)}.${token.slice(21)}`,
        // Same bytes, non-canonical last character (its 2 spare bits set).
        `${token.slice(0, 42)}${String.fromCharCode(token.charCodeAt(42) ^ 1)}`,
        'x'.repeat(10_000)
      ]
      for (const bad of malformed) {
        t.notOk(isWellFormedToken(bad), JSON.stringify(bad.slice(0, 50)))
        t.equal(await store.get(bad), null)
      }
    })
  })
}

t.test('memory store sweeps expired sessions so it stays bounded', async (t) => {
  const clock = { at: START }
  const store = new MemorySessionStore({ idleTtlMs: IDLE, absoluteTtlMs: ABSOLUTE, now: () => clock.at, sweepEveryMs: MIN })
  for (let i = 0; i < 50; i++) await store.create(patient({ subject: `s-${i}`, idpSessionId: `sid-${i}` }))
  t.equal(store.size, 50)
  clock.at += IDLE
  const survivor = await store.create(patient())
  t.equal(store.size, 1, 'expired sessions swept on the next create')
  t.ok(await store.get(survivor.token))
  t.equal(await store.revokeByIdpSession('https://idp.example', 'sid-1'), 0, 'indexes swept too')
  const late = await store.create(patient({ idpSessionId: 'sid-x' }))
  clock.at += IDLE
  t.equal(await store.revokeByIdpSession('https://idp.example', 'sid-x'), 0, 'an expired session does not count')
  t.equal(await store.get(late.token), null)
  const defaults = new MemorySessionStore({ idleTtlMs: IDLE, absoluteTtlMs: ABSOLUTE })
  const { session } = await defaults.create(patient())
  t.ok(Math.abs(session.createdAt - Date.now()) < 5000, 'the real clock by default')
})

t.test('redis store', async (t) => {
  await redisServer.flush()
  const sharedState = createSharedState({ url: redisServer.url, log: silent })
  t.teardown(() => sharedState.close())
  const redis = await connected(sharedState)
  const clock = { at: START }
  const options = { idleTtlMs: IDLE, absoluteTtlMs: ABSOLUTE, now: () => clock.at }
  const store = new RedisSessionStore(redis, options)

  t.test('every key expires by itself', async (t) => {
    await store.create(patient({ idpSessionId: 'sid-ttl' }))
    for (const key of await redis.keys('bff:session:*')) {
      const ttl = await redis.pttl(key)
      t.ok(ttl > 0 && ttl <= ABSOLUTE, `${key.split(':')[2] ?? ''} key has a TTL`)
    }
  })

  t.test('an index lives as long as its sessions can (the absolute lifetime), not the idle one', async (t) => {
    // A session in use outlives its first idle lifetime; a back-channel logout then must still
    // find it through its indexes.
    await redisServer.flush()
    await store.create(patient({ idpSessionId: 'sid-in-use' }))
    const indexes = await redis.keys('bff:session:idx:*')
    t.equal(indexes.length, 2)
    for (const key of indexes) {
      const ttl = await redis.pttl(key)
      t.ok(ttl > ABSOLUTE - 5000 && ttl <= ABSOLUTE, `${key.split(':')[3] ?? ''} index expires with the absolute lifetime (${ttl})`)
    }
  })

  t.test('a partial or damaged hash is no session', async (t) => {
    const { token, session } = await store.create(patient())
    const key = `bff:session:s:{${session.id}}`
    await redis.hset(key, 'method', 'admin')
    t.equal(await store.get(token), null)
    await redis.hset(key, 'method', 'mobile', 'createdAt', 'soon')
    t.equal(await store.get(token), null)
    await redis.del(key)
    await redis.hset(key, 'lastSeenAt', String(START))
    t.equal(await store.get(token), null)
    const whole = await store.create(patient())
    await redis.hdel(`bff:session:s:{${whole.session.id}}`, 'email')
    t.equal(await store.get(whole.token), null, 'live by its times, but without an email')
  })

  t.test('a lookup is one command: read, expiry, touch and counters in one script', async (t) => {
    const { token, session } = await store.create(patient())
    const key = `bff:session:s:{${session.id}}`
    // MONITOR runs on a connection of its own (ioredis duplicates the client for it).
    const monitor = await redis.monitor()
    t.teardown(() => monitor.disconnect())
    const sent: string[] = []
    monitor.on('monitor', (_time: string, args: string[], source: string) => {
      // Commands a script runs are reported with source "lua"; the client's own come from its address.
      if (source !== 'lua') sent.push(String(args[0]).toLowerCase())
    })
    const rate = { count: 10, windowMs: MIN }
    clock.at += 2 * MIN
    const touched = await store.lookup(token, [{ scope: 'session', rate }, { scope: 'cancel', rate }])
    t.equal(touched.session?.lastSeenAt, clock.at, 'touched')
    t.same(touched.hits.map((hit) => hit.count), [1, 1], 'counted')
    clock.at += IDLE
    t.same(await store.lookup(token, [{ scope: 'session', rate }]), { session: null, hits: [] }, 'expired')
    await redis.ping('done')
    while (!sent.includes('ping')) await new Promise((resolve) => setTimeout(resolve, 5))
    t.same(sent, ['evalsha', 'evalsha', 'ping'], 'one command per lookup')
    t.equal(await redis.exists(key), 0, 'the expired session deleted by its lookup')
  })

  t.test('an index holds only sessions that can still exist, however often the patient signs in', async (t) => {
    const subject = { subject: 'daily-patient', idpSessionId: 'sid-daily' }
    const indexes = async () => await Promise.all((await redis.keys('bff:session:idx:*')).map(async (key) => await redis.zcard(key)))
    await redisServer.flush()
    for (let day = 0; day < 5; day++) {
      await store.create(patient(subject))
      // The idle lifetime ends each session; the patient signs in again the next day.
      clock.at += 24 * 60 * MIN
    }
    const latest = await store.create(patient(subject))
    t.same(await indexes(), [1, 1], 'each sign-in pruned the sessions past their absolute expiry (before: 6 ids each)')
    const again = await store.create(patient(subject))
    t.same(await indexes(), [2, 2], 'live sessions are kept')
    t.equal(await store.revokeBySubject('https://idp.example', 'daily-patient'), 2, 'both live ones revoked')
    t.equal(await store.get(latest.token), null)
    t.equal(await store.get(again.token), null)
    t.same(await redis.keys('bff:session:idx:sub:*'), [], 'the subject index emptied of what it revoked')
  })

  t.test('a signed-out session leaves its indexes, as in the memory store', async (t) => {
    await redisServer.flush()
    const cards = async () => await Promise.all((await redis.keys('bff:session:idx:*')).sort().map(async (key) => await redis.zcard(key)))
    // A patient (or a script with their account) signing in and out again and again within one
    // absolute lifetime: every ended session's id stays in both indexes until its absolute expiry
    // (12 h by default), while the memory store drops it at once (#delete). 1000 rounds hold about
    // 130 KB per index of ids that name nothing, and a back-channel logout then reads them all.
    for (let round = 0; round < 50; round++) {
      const { token } = await store.create(patient({ subject: 'in-and-out', idpSessionId: 'sid-in-and-out' }))
      await store.revoke(token)
    }
    const kept = await store.create(patient({ subject: 'in-and-out', idpSessionId: 'sid-in-and-out' }))
    const byId = await store.create(patient({ subject: 'in-and-out', idpSessionId: 'sid-in-and-out' }))
    await store.revokeById(byId.session.id)
    t.same(await cards(), [1, 1], 'only the live session is indexed (before: 52 ids in each index)')
    t.equal(await store.revokeBySubject('https://idp.example', 'in-and-out'), 1)
    t.equal(await store.get(kept.token), null)
  })

  t.test('sessions indexed by the earlier version (plain sets) are still ended by a back-channel logout', async (t) => {
    const hashed = (value: string) => createHash('sha256').update(`https://idp.example\0${value}`).digest('base64url')
    const { token, session } = await store.create(patient({ subject: 'upgraded', idpSessionId: 'sid-upgraded' }))
    // As the earlier version left it: the same session, indexed in sets under the old names only.
    for (const [kind, value] of [['sub', 'upgraded'], ['sid', 'sid-upgraded']] as const) {
      await redis.del(`bff:session:idx:${kind}:${hashed(value)}`)
      await redis.sadd(`bff:session:${kind}:${hashed(value)}`, session.id)
    }
    const other = await store.create(patient({ subject: 'upgraded' }))
    t.equal(await store.revokeBySubject('https://idp.example', 'upgraded'), 2, 'the old set\'s session and the new index\'s')
    t.equal(await store.get(token), null)
    t.equal(await store.get(other.token), null)
    t.equal(await redis.exists(`bff:session:sub:${hashed('upgraded')}`), 0, 'the old set emptied')
    t.equal(await store.revokeByIdpSession('https://idp.example', 'sid-upgraded'), 0, 'nothing left to end')
  })

  t.test('a key lives no longer than its session can: the idle lifetime at first, what is left of the absolute one at the end', async (t) => {
    const mine = { at: START }
    const short = new RedisSessionStore(redis, { idleTtlMs: 2 * MIN, absoluteTtlMs: 5 * MIN, now: () => mine.at })
    const { token, session } = await short.create(patient())
    const key = `bff:session:s:{${session.id}}`
    const created = await redis.pttl(key)
    t.ok(created > 2 * MIN - 5000 && created <= 2 * MIN, `${created} ms after create: the idle lifetime, not the absolute one`)
    // Used every 100 s, the session lives to its absolute end; the last touch leaves 20 s of it.
    for (const after of [100_000, 200_000, 280_000]) {
      mine.at = START + after
      t.equal((await short.get(token))?.lastSeenAt, mine.at, `touched at ${after / 1000} s`)
    }
    const ttl = await redis.pttl(key)
    t.ok(ttl > 15_000 && ttl <= 20_000, `${ttl} ms after the last touch: what is left of the absolute lifetime, not the idle one`)
  })

  t.test('default clock and prefix', async (t) => {
    const real = new RedisSessionStore(redis, { idleTtlMs: IDLE, absoluteTtlMs: ABSOLUTE })
    const { token, session } = await real.create(patient())
    t.ok(Math.abs(session.createdAt - Date.now()) < 5000)
    t.equal(await redis.exists(`bff:session:s:{${session.id}}`), 1)
    t.ok(await real.get(token))
  })

  t.test('sessions are judged on Redis\'s clock: replicas whose clocks are far apart see the same sessions', async (t) => {
    // The wall clock, replaced before the stores take it as their default: each step below runs
    // with this process's clock moved by `offset`, as on another machine.
    const wallNow = Date.now
    let offset = 0
    Date.now = () => wallNow() + offset
    t.teardown(() => { Date.now = wallNow })
    const [seconds, micros] = await redis.time()
    const redisAt = Number(seconds) * 1000 + Math.floor(Number(micros) / 1000)
    // Two replicas (on the default clock), one ahead and one behind by twice the idle lifetime.
    const ahead = new RedisSessionStore(redis, { idleTtlMs: IDLE, absoluteTtlMs: ABSOLUTE })
    const behind = new RedisSessionStore(redis, { idleTtlMs: IDLE, absoluteTtlMs: ABSOLUTE })
    const onClock = async <T> (by: number, step: () => Promise<T>): Promise<T> => {
      offset = by
      try {
        return await step()
      } finally {
        offset = 0
      }
    }
    const { token, session } = await onClock(-2 * IDLE, async () => await behind.create(patient({ subject: 'far-apart', idpSessionId: 'sid-far-apart' })))
    t.ok(Math.abs(session.createdAt - redisAt) < 5000, 'created at Redis\'s time, not the replica\'s')
    t.equal(session.absoluteExpiresAt, session.createdAt + ABSOLUTE, 'its absolute lifetime counted from there')
    const seen = await onClock(2 * IDLE, async () => await ahead.get(token))
    t.equal(seen?.id, session.id, 'a replica ahead by more than the idle lifetime still finds it alive')
    t.equal(await redis.exists(`bff:session:s:{${session.id}}`), 1, 'and leaves it in place')
    t.equal(await onClock(-2 * IDLE, async () => (await behind.get(token))?.id), session.id, 'as does the one behind')
    t.equal(await onClock(ABSOLUTE, async () => await ahead.revokeByIdpSession('https://idp.example', 'sid-far-apart')), 1, 'a back-channel logout on a replica ahead by more than the absolute lifetime ends it')
    t.equal(await behind.get(token), null)
  })
})

t.test('redis down or slow: 503 with Retry-After, quickly, never a memory fallback', async (t) => {
  const server = await startRedis(t)
  const sharedState = createSharedState({ url: server.url, log: silent })
  t.teardown(() => sharedState.close())
  await connected(sharedState)
  const store = createSessionStore(sharedState, { idleTtlMs: IDLE, absoluteTtlMs: ABSOLUTE })
  t.ok(store instanceof RedisSessionStore)
  const { token } = await store.create(patient({ idpSessionId: 'sid-1' }))

  const expect503 = async (name: string, operation: () => unknown): Promise<void> => {
    const started = Date.now()
    const error = await Promise.resolve().then(operation).then(() => null, (caught: unknown) => caught)
    t.ok(error instanceof ApiError, `${name} fails`)
    t.match(error, { statusCode: 503, code: 'SERVICE_UNAVAILABLE', headers: { 'retry-after': '1' } }, name)
    t.ok(Date.now() - started < 1000, `${name} fails fast`)
  }

  // Slow: the server holds every command; the client's command timeout answers for it.
  const admin = redisClient(server.url, { maxRetriesPerRequest: 0 })
  await admin.call('CLIENT', 'PAUSE', '1500', 'ALL')
  t.equal(sharedState.mode(), 'redis')
  await expect503('get while paused', () => store.get(token))
  t.equal(sharedState.mode(), 'degraded', 'a session command that timed out on a connected client: degraded, as /readyz says')
  admin.disconnect()

  await server.stop()
  await expect503('create', () => store.create(patient()))
  await expect503('get', () => store.get(token))
  await expect503('revoke', () => store.revoke(token))
  await expect503('revokeBySubject', () => store.revokeBySubject('https://idp.example', 'subject-1'))
  await expect503('revokeByIdpSession', () => store.revokeByIdpSession('https://idp.example', 'sid-1'))
  t.equal(await store.get('malformed'), null, 'a malformed token is refused without asking Redis')
})

t.test('memory: the per-session limits keep their windows when the wall clock steps back', async (t) => {
  // The wall clock, replaced before the store takes it as its default.
  const wallNow = Date.now
  let offset = 0
  Date.now = () => wallNow() + offset
  t.teardown(() => { Date.now = wallNow })
  const store = new MemorySessionStore({ idleTtlMs: 3_600_000 * 3, absoluteTtlMs: 3_600_000 * 3 })
  const { token } = await store.create(patient())
  const perSession = { scope: 'session', rate: { count: 5, windowMs: MIN } }
  t.equal((await store.lookup(token, [perSession])).hits[0]?.count, 1)
  // NTP steps the wall clock an hour back.
  offset = -3_600_000
  const hit = (await store.lookup(token, [perSession])).hits[0]
  t.equal(hit?.count, 2)
  t.ok((hit?.resetMs ?? Infinity) <= MIN, `the window still ends within a minute (${hit?.resetMs} ms)`)
})
