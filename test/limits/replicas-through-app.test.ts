import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import type { LightMyRequestResponse } from 'fastify'
import { buildTestApp, signIn, TEST_API_KEY } from '../helpers/app.js'
import { startRedis } from '../helpers/redis.js'
import { startSandbox } from '../helpers/sandbox.js'
import { DEMO_PATIENTS } from '../../src/care360/sandbox.js'
import { maxInAnyWindow } from './fixtures/support.js'

/**
 * The org budget and the upstream cooldown as the contract states them, through the whole app:
 * two app instances (replicas) sharing one Redis, the sandbox upstream behind them.
 */
const redis = await startRedis(t)
const alice = DEMO_PATIENTS[0] as { email: string, appointments: ReadonlyArray<{ id: string }> }

function retryAfter (answer: LightMyRequestResponse): number {
  const text = String(answer.headers['retry-after'])
  if (!/^[0-9]+$/.test(text)) throw new Error(`Retry-After is not delay-seconds: ${text}`)
  return Number(text)
}

t.test('two replicas, concurrent bursts: the upstream gets exactly the budget\'s count in a window, the rest 429 UPSTREAM_RATE_LIMITED with a Retry-After that is the real wait', async (t) => {
  const sandbox = await startSandbox(t, { apiKey: TEST_API_KEY, quota: { count: 500, windowMs: 60_000 } })
  // The budget's keys are fixed (`{bff:budget}`): this test has the file's Redis to itself.
  const env = { CV_RATE_LIMIT: '6/4s', RATE_LIMIT_SESSION: '100/1m', RATE_LIMIT_IP: '1000/1m' }
  const replicas = await Promise.all([1, 2].map(async () => await buildTestApp(t, { redis, upstreamUrl: sandbox.url, env })))
  const tokens = await Promise.all(replicas.map(async ({ app, issuer }) => await signIn(app, issuer, alice.email)))
  const list = async (i: number): Promise<LightMyRequestResponse> => {
    const { app } = replicas[i % 2] as { app: typeof replicas[0]['app'] }
    return await app.inject({ url: '/appointments', headers: { authorization: `Bearer ${tokens[i % 2] as string}` } })
  }
  const burst = await Promise.all(Array.from({ length: 20 }, async (_, i) => await list(i)))
  const ok = burst.filter((answer) => answer.statusCode === 200)
  const refused = burst.filter((answer) => answer.statusCode === 429)
  t.equal(ok.length, 6, 'exactly the count admitted across both replicas')
  t.equal(refused.length, 14, 'every other one refused')
  t.equal(sandbox.control.calls.length, 6, 'the upstream got the count, no more')
  for (const answer of refused) {
    t.equal(answer.json().code, 'UPSTREAM_RATE_LIMITED')
    const wait = retryAfter(answer)
    // The window is 4 s and its guard 40 ms: the first admission leaves it within 5 s (and not
    // before 2 s, unless this burst took two seconds). Not too short: see the wait below.
    t.ok(wait >= 2 && wait <= 5, `Retry-After ${wait} is the time until the window's oldest call leaves it`)
  }
  // A second burst just before the oldest admission leaves the span: nothing more.
  const wait = Math.min(...refused.map(retryAfter))
  const second = await Promise.all(Array.from({ length: 6 }, async (_, i) => await list(i)))
  t.same(second.map((answer) => answer.statusCode), [429, 429, 429, 429, 429, 429], 'still spent')
  t.equal(sandbox.control.calls.length, 6)
  // Waiting as told is enough: the next request is admitted. (The burst's admissions leave the
  // window over the few milliseconds they took, so a burst then gets what has left, up to the count.)
  await sleep(wait * 1000)
  t.equal((await list(0)).statusCode, 200, 'admitted after the shortest Retry-After')
  const third = await Promise.all(Array.from({ length: 10 }, async (_, i) => await list(i)))
  const admitted = third.filter((answer) => answer.statusCode === 200).length
  t.ok(admitted <= 5, `then at most the rest of the count: ${admitted}`)
  t.equal(sandbox.control.calls.length, 7 + admitted)
  t.ok(maxInAnyWindow(sandbox.control.calls.map((call) => call.at), 4000) <= 6, 'no interval of the window\'s length saw more than the count')
  t.notOk(burst.concat(second, third).some((answer) => answer.statusCode !== 200 && answer.statusCode !== 429), 'nothing but admissions and the budget\'s refusals')
})

t.test('two replicas: an upstream 429 without Retry-After stops both, for list and cancel alike, with no upstream call; backoff doubles per episode', async (t) => {
  // The upstream's own quota is one call a minute, and it sends no Retry-After.
  const sandbox = await startSandbox(t, { apiKey: TEST_API_KEY, quota: { count: 1, windowMs: 60_000, sendRetryAfter: false } })
  const env = { CV_RATE_LIMIT: '100/1m', OWNERSHIP_CHECK: 'off' }
  // A Redis of its own: the budget and cooldown keys are the organization's, fixed.
  const fresh = await startRedis(t)
  const [a, b] = await Promise.all([1, 2].map(async () => await buildTestApp(t, { redis: fresh, upstreamUrl: sandbox.url, env }))) as [Awaited<ReturnType<typeof buildTestApp>>, Awaited<ReturnType<typeof buildTestApp>>]
  const tokenA = await signIn(a.app, a.issuer, alice.email)
  const tokenB = await signIn(b.app, b.issuer, alice.email)
  const listOn = async (app: typeof a.app, token: string): Promise<LightMyRequestResponse> => await app.inject({ url: '/appointments', headers: { authorization: `Bearer ${token}` } })
  const cancelOn = async (app: typeof a.app, token: string): Promise<LightMyRequestResponse> => await app.inject({ method: 'POST', url: `/appointments/${alice.appointments[1]?.id ?? ''}/cancel`, headers: { authorization: `Bearer ${token}` } })

  t.equal((await listOn(a.app, tokenA)).statusCode, 200, 'the quota\'s one call')
  const first = await listOn(a.app, tokenA)
  t.equal(first.statusCode, 429)
  t.equal(first.json().code, 'UPSTREAM_RATE_LIMITED')
  const firstWait = retryAfter(first)
  // The first backoff: 1 s ± 25%, in whole seconds rounded up.
  t.ok(firstWait >= 1 && firstWait <= 2, `first episode: Retry-After ${firstWait}`)
  t.equal(sandbox.control.calls.length, 2)

  // The other replica, at once: list and cancel both stopped without an upstream call.
  const list = await listOn(b.app, tokenB)
  const cancel = await cancelOn(b.app, tokenB)
  for (const answer of [list, cancel]) {
    t.equal(answer.statusCode, 429)
    t.equal(answer.json().code, 'UPSTREAM_RATE_LIMITED')
    const wait = retryAfter(answer)
    t.ok(wait >= 1 && wait <= firstWait, `Retry-After ${wait} is what is left of the cooldown`)
  }
  t.equal(sandbox.control.calls.length, 2, 'no upstream call during the cooldown')

  // After it: the next call goes, meets the upstream's 429 again, and the second episode is longer.
  await sleep(1300)
  const again = await listOn(b.app, tokenB)
  t.equal(again.statusCode, 429)
  t.equal(sandbox.control.calls.length, 3, 'one call after the cooldown ended')
  const secondWait = retryAfter(again)
  // 2 s ± 25%: 1.5 s to 2.5 s.
  t.ok(secondWait >= 2 && secondWait <= 3, `second episode: Retry-After ${secondWait}`)
  const meanwhile = await cancelOn(a.app, tokenA)
  t.equal(meanwhile.statusCode, 429)
  t.equal(sandbox.control.calls.length, 3, 'the first replica holds back too')
})
