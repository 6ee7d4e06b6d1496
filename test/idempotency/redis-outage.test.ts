import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import pino from 'pino'
import { startRedis } from '../helpers/redis.js'
import { ErrorCode } from '../../src/errors.js'
import { createSharedState } from '../../src/state/redis.js'
import { createIdempotency, idempotencyStoreFor, type HandleInput } from '../../src/idempotency/index.js'
import { APPOINTMENT, CANCELLED, EMAIL, fakeCancel, scopeOf, type FakeCancel } from './fakes.js'

function request (cancel: FakeCancel, key: string | undefined): HandleInput {
  return {
    scope: scopeOf(EMAIL),
    key,
    appointmentId: APPOINTMENT,
    reason: undefined,
    run: cancel.run,
    resolveUnknown: async () => 'send'
  }
}

t.test('Redis goes away and comes back, through the process\'s shared client', async (t) => {
  const server = await startRedis(t)
  const sharedState = createSharedState({ url: server.url, log: pino({ level: 'silent' }) })
  t.teardown(() => sharedState.close())
  while (sharedState.mode() !== 'redis') await sleep(10)
  const warnings: string[] = []
  const idem = createIdempotency({
    store: idempotencyStoreFor(sharedState),
    inFlightTtlMs: 2000,
    log: { warn: (_object, message) => warnings.push(message) }
  })
  const cancel = fakeCancel()
  t.same(await idem.handle(request(cancel, 'before-outage')), { answer: CANCELLED, earlier: null })

  await server.stop()
  const began = Date.now()
  await t.rejects(idem.handle(request(cancel, 'during-outage')), { statusCode: 503, code: ErrorCode.SERVICE_UNAVAILABLE, headers: { 'Retry-After': '2' } })
  t.ok(Date.now() - began < 1000, 'answered at once, no hang')
  t.equal(cancel.sends(), 1, 'a keyed cancel is never sent without the store')
  t.same(await idem.handle(request(cancel, undefined)), { answer: CANCELLED, earlier: null }, 'a key-less cancel proceeds')
  t.equal(cancel.sends(), 2)
  // The keyed 503 is logged where it is answered (plugins/answers.ts); the key-less cancel going
  // on without the store says so here.
  t.same(warnings, ['idempotency store unavailable: single flight is per process'])

  await server.start()
  const deadline = Date.now() + 5000
  while (sharedState.mode() !== 'redis' && Date.now() < deadline) await sleep(20)
  t.same(await idem.handle(request(cancel, 'after-outage')), { answer: CANCELLED, earlier: null }, 'recovers on its own')
})
