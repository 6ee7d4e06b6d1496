import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { pino } from 'pino'
import { ApiError } from '../../src/errors.js'
import { createSessionStore, type NewSession } from '../../src/auth/session-store.js'
import { createUnlessLoggedOut } from '../../src/auth/sign-in.js'
import { createSharedState } from '../../src/state/redis.js'
import { startRedis } from '../helpers/redis.js'

/**
 * createUnlessLoggedOut (sign-in.ts): when the second look at the logout marks fails, the session
 * it made is ended before the sign-in fails, not after. A sign-in answered 503 while its session
 * is still stored is the state the last session's fix removed; ending it in the background would
 * leave it readable by whoever holds the token meanwhile, and unended if the process stops first
 * (found by a mutation review: `void` in place of `await` on the revocation passed every test,
 * since the memory store's revocation is done within a tick).
 */
const patient: NewSession = { email: 'patient@example.com', subject: 'subject-1', issuer: 'https://idp.example', method: 'mobile', idpSessionId: null }
const signIn = { issuer: 'https://idp.example', subject: 'subject-1', sid: null, authTime: Math.floor(Date.now() / 1000) }

t.test('a failed look ends its session before the sign-in fails (Redis store)', async (t) => {
  const redis = await startRedis(t)
  const state = createSharedState({ url: redis.url, log: pino({ level: 'silent' }) })
  t.teardown(() => state.close())
  const readyBy = Date.now() + 5000
  while (state.mode() !== 'redis' && Date.now() < readyBy) await sleep(10)
  const store = createSessionStore(state, { idleTtlMs: 60_000, absoluteTtlMs: 120_000 })
  let token: string | undefined
  // The store as it is, its revocation a round trip later than the look's failure.
  const sessions = {
    create: async (input: NewSession) => { const created = await store.create(input); token = created.token; return created },
    revokeById: async (id: string) => { await sleep(50); return await store.revokeById(id) }
  }
  const unreachable = new ApiError(503, 'SERVICE_UNAVAILABLE', 'Session store unavailable')
  await t.rejects(createUnlessLoggedOut(sessions, { loggedOut: async () => { throw unreachable } }, signIn, patient), unreachable)
  t.equal(await store.get(token as string), null, 'the session is gone when the sign-in fails')
})
