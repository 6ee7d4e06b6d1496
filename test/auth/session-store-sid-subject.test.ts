import t from 'tap'
import { createHash } from 'node:crypto'
import { startRedis } from '../helpers/redis.js'
import { sharedStateOn } from '../limits/fixtures/support.js'
import { RedisSessionStore } from '../../src/auth/session-store.js'

/**
 * revokeByIdpSession with a subject (a logout token naming both sid and sub, Back-Channel Logout
 * 1.0, 2.7) ends that subject's sessions of the IdP session only: the others keep their sessions
 * and their index entries, in the sorted-set index and in the earlier version's plain set alike,
 * so that a later logout by that sid alone still finds them. The entries of a session already
 * gone leave with the rest.
 */
const server = await startRedis(t)
const ISSUER = 'https://idp.example'
const hashed = (value: string): string => createHash('sha256').update(`${ISSUER}\0${value}`).digest('base64url')
const patient = (subject: string) => ({ email: 'p@example.com', subject, issuer: ISSUER, method: 'mobile' as const, idpSessionId: 'sid-shared' })

t.test('the earlier version\'s plain set keeps the other subject\'s entry: a later logout by sid alone still ends it', async (t) => {
  await server.flush()
  const redis = (await sharedStateOn(t, server.url)).redis!
  const store = new RedisSessionStore(redis, { idleTtlMs: 60 * 60_000, absoluteTtlMs: 2 * 60 * 60_000 })
  const alice = await store.create(patient('alice'))
  const bob = await store.create(patient('bob'))
  // As the earlier version left them: indexed by sid in a plain set under the old name only.
  await redis.del(`bff:session:idx:sid:${hashed('sid-shared')}`)
  await redis.sadd(`bff:session:sid:${hashed('sid-shared')}`, alice.session.id, bob.session.id)

  t.equal(await store.revokeByIdpSession(ISSUER, 'sid-shared', 'bob'), 1, "bob's session of that sid")
  t.equal(await store.get(bob.token), null)
  t.not(await store.get(alice.token), null, "alice's lives on")
  t.same(await redis.smembers(`bff:session:sid:${hashed('sid-shared')}`), [alice.session.id], "alice's entry stays in the old set")
  t.equal(await store.revokeByIdpSession(ISSUER, 'sid-shared'), 1, 'a logout by the sid alone still finds it')
  t.equal(await store.get(alice.token), null)
})

t.test('a session already gone leaves the index with the named subject\'s; the other subject\'s stays', async (t) => {
  await server.flush()
  const redis = (await sharedStateOn(t, server.url)).redis!
  const store = new RedisSessionStore(redis, { idleTtlMs: 60 * 60_000, absoluteTtlMs: 2 * 60 * 60_000 })
  const gone = await store.create(patient('carol'))
  const alice = await store.create(patient('alice'))
  const bob = await store.create(patient('bob'))
  // Its key gone (its idle lifetime ended) while its entry waits for its absolute expiry.
  await redis.del(`bff:session:s:{${gone.session.id}}`)
  const index = `bff:session:idx:sid:${hashed('sid-shared')}`
  t.equal(await redis.zcard(index), 3)

  t.equal(await store.revokeByIdpSession(ISSUER, 'sid-shared', 'bob'), 1, "bob's session of that sid")
  t.same(await redis.zrange(index, 0, -1), [alice.session.id], "only alice's entry is left: bob's and the gone session's leave")
  t.not(await store.get(alice.token), null)
  t.equal(await store.get(bob.token), null)
})
