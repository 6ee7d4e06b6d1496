import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { DEMO_PATIENTS } from '../../src/care360/sandbox.js'
import { ErrorCode } from '../../src/errors.js'
import { buildTestApp, signIn } from '../helpers/app.js'
import { startRedis } from '../helpers/redis.js'
import { SANDBOX_KEY } from '../helpers/sandbox.js'
import { startSandboxedApp, UNLIMITED } from './support.js'

/**
 * A key-less cancel following a leader on another replica that died waits up to that leader's
 * in-flight lifetime, then would lead itself: in a replica shutting down, that is longer than its
 * shutdown deadline leaves it. So it hands the lead back instead (503, nothing sent), and the
 * client's retry leads on a replica that stays.
 */
const alice = DEMO_PATIENTS[0]!
const appointment = alice.appointments[0]!
const UPSTREAM_TIMEOUT_MS = 300

t.test('a key-less cancel following a dead leader, in a replica shutting down, answers 503 and sends nothing', async (t) => {
  const redis = await startRedis(t)
  const a = await startSandboxedApp(t, { upstreamTimeoutMs: UPSTREAM_TIMEOUT_MS, email: alice.email, redis })
  const b = await buildTestApp(t, {
    upstreamUrl: a.sandbox.url,
    redis,
    env: { CV_API_KEY: SANDBOX_KEY, CV_TIMEOUT_MS: String(UPSTREAM_TIMEOUT_MS), ...UNLIMITED }
  })
  const tokenB = await signIn(b.app, b.issuer, alice.email)
  const cancel = (app: typeof a.app, token: string) => app.inject({
    method: 'POST',
    url: `/appointments/${appointment.id}/cancel`,
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    payload: { reason: 'Feeling better' }
  })
  const posts = (): number => a.sandbox.control.calls.filter((call) => call.method === 'POST').length

  // Replica A leads, and dies while its cancel is upstream: its record is never completed, and its
  // in-flight marker stays until its lifetime ends (3 × 300 ms + 2 s).
  a.sandbox.control.setFailure({ kind: 'slow', delayMs: 1000, endpoint: 'cancel', times: 1 })
  const leading = cancel(a.app, a.token)
  for (let i = 0; i < 200 && posts() === 0; i++) await sleep(10)
  t.equal(posts(), 1, 'the leader\'s cancel is upstream')
  a.app.sharedState.redis!.disconnect()
  await leading
  await sleep(300)

  // Replica B, shutting down, gets the same cancel: it follows the dead leader until its marker
  // expires, then hands the lead back.
  b.app.draining = true
  const began = Date.now()
  const answer = await cancel(b.app, tokenB)
  t.equal(answer.statusCode, 503)
  t.equal(answer.json().code, ErrorCode.SERVICE_UNAVAILABLE)
  t.equal(answer.headers['retry-after'], '1')
  t.ok(Date.now() - began < 3 * UPSTREAM_TIMEOUT_MS + 2000, 'within one in-flight lifetime')
  await sleep(100)
  t.equal(posts(), 1, 'no second cancel reached the upstream')

  // Its retry on a replica that stays (B again, no longer shutting down, standing in for one)
  // leads at once.
  b.app.draining = false
  const retried = await cancel(b.app, tokenB)
  t.equal(retried.statusCode, 200)
  t.equal(posts(), 2)
})
