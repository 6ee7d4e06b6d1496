import t from 'tap'
import { startRedis } from '../helpers/redis.js'
import { sharedStateOn } from '../limits/fixtures/support.js'
import { RedisSessionStore } from '../../src/auth/session-store.js'

/**
 * `SESSION_ABSOLUTE_TTL` lowered by a deploy (or during a rolling one, replicas on both values):
 * a sign-in under the shorter lifetime must not shorten the life of its subject's index below
 * the sessions already in it, or a back-channel logout for that subject, once the index expired,
 * finds none of them and they live on.
 */
const server = await startRedis(t)

t.test('a sign-in with a shorter absolute lifetime keeps the index as long as the sessions already in it', async (t) => {
  const state = await sharedStateOn(t, server.url)
  const redis = state.redis!
  const before = new RedisSessionStore(redis, { idleTtlMs: 60 * 60_000, absoluteTtlMs: 12 * 60 * 60_000 })
  const after = new RedisSessionStore(redis, { idleTtlMs: 1000, absoluteTtlMs: 1500 })
  const patient = { email: 'p@example.com', subject: 'sub-p', issuer: 'https://idp.example', method: 'mobile' as const, idpSessionId: 'sid-p' }
  const { token } = await before.create(patient)
  await after.create({ ...patient, idpSessionId: 'sid-q' })
  const [index] = await redis.keys('bff:session:idx:sub:*')
  const left = await redis.pttl(index!)
  t.ok(left > 11 * 60 * 60_000, `the subject's index still lives as long as the first session can (${left} ms)`)
  // Past the shorter lifetime, the first session is still live, and a logout by subject ends it.
  await new Promise((resolve) => setTimeout(resolve, 1700))
  t.not((await before.lookup(token, [])).session, null, 'the first session is live')
  t.equal(await before.revokeBySubject(patient.issuer, patient.subject), 1, 'a back-channel logout by subject finds it')
  t.equal((await before.lookup(token, [])).session, null, 'and ends it')
})

t.test('a later sign-in lengthens the index to its own absolute lifetime', async (t) => {
  await server.flush()
  const state = await sharedStateOn(t, server.url)
  const redis = state.redis!
  const store = new RedisSessionStore(redis, { idleTtlMs: 60 * 60_000, absoluteTtlMs: 12 * 60 * 60_000 })
  const patient = { email: 'p@example.com', subject: 'sub-later', issuer: 'https://idp.example', method: 'mobile' as const, idpSessionId: 'sid-later' }
  await store.create(patient)
  const indexes = await redis.keys('bff:session:idx:*')
  t.equal(indexes.length, 2)
  // As if the first sign-in were almost 12 h old: its index a second from its end.
  for (const index of indexes) await redis.pexpire(index, 1000)
  await store.create(patient)
  for (const index of indexes) {
    const left = await redis.pttl(index)
    t.ok(left > 11 * 60 * 60_000, `${index.split(':')[3]} index: as long as the new session can live (${left} ms)`)
  }
})
