import t from 'tap'
import { request } from 'undici'
import { SANDBOX_KEY, startSandbox } from '../helpers/sandbox.js'

/**
 * `maxRecordedCalls` bounds the sandbox's recorded calls (at least that many, the latest, and
 * fewer than twice as many). At 0, "fewer than twice as many" was never reached: the oldest half
 * (none) was dropped on every call and every call was kept, the unbounded list the option exists
 * to prevent. 0 keeps none.
 */
t.test('maxRecordedCalls 0 keeps no call', async (t) => {
  const sandbox = await startSandbox(t, { maxRecordedCalls: 0 })
  for (let n = 1; n <= 4; n++) {
    const answer = await request(`${sandbox.url}/api/v1/calendar/appointments?email=n${n}@example.com`, { headers: { 'cv-api-key': SANDBOX_KEY } })
    await answer.body.dump() // answered or refused, the call reached the endpoint and was recorded
  }
  t.equal(sandbox.control.calls.length, 0, 'none recorded')
})

t.test('by default, far more calls than a test makes are kept (10 000)', async (t) => {
  const sandbox = await startSandbox(t)
  for (let n = 1; n <= 25; n++) {
    const answer = await request(`${sandbox.url}/api/v1/calendar/appointments?email=n${n}@example.com`, { headers: { 'cv-api-key': SANDBOX_KEY } })
    await answer.body.dump()
  }
  t.equal(sandbox.control.calls.length, 25, 'every one recorded')
})
