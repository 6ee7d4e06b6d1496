import t from 'tap'
import { createIdempotency, createMemoryIdempotencyStore, type HandleInput } from '../../src/idempotency/index.js'
import type { IdempotencyStore } from '../../src/idempotency/store.js'
import { RepeatedWarnings } from '../../src/state/notice.js'
import { APPOINTMENT, EMAIL, REASON, fakeCancel, scopeOf, type FakeCancel } from './fakes.js'

// Review of cf51a4e: a lost Idempotency record write is now told through the app's
// RepeatedWarnings (one line per message per minute). Before it, every lost write was a line.

const MIN = 60_000

function keyed (cancel: FakeCancel, key: string, appointmentId: string): HandleInput {
  return {
    scope: scopeOf(EMAIL),
    key,
    appointmentId,
    reason: REASON,
    run: cancel.run,
    resolveUnknown: async () => { throw new Error('not used') }
  }
}

function harness (failures: Array<() => Promise<boolean>>): { idem: ReturnType<typeof createIdempotency>, lines: Array<{ fields: Record<string, unknown>, message: string }>, clock: { at: number }, timers: Array<() => void> } {
  const lines: Array<{ fields: Record<string, unknown>, message: string }> = []
  const log = { warn: (fields: object, message: string) => { lines.push({ fields: fields as Record<string, unknown>, message }) } }
  const memory = createMemoryIdempotencyStore()
  let i = 0
  const store: IdempotencyStore = {
    ...memory,
    complete: () => (failures[i++] as () => Promise<boolean>)()
  }
  const clock = { at: 0 }
  // A timer the test fires by hand (a third argument the current RepeatedWarnings ignores).
  const timers: Array<() => void> = []
  const Warnings = RepeatedWarnings as unknown as new (everyMs: number, now: () => number, schedule: (fire: () => void, ms: number) => void) => RepeatedWarnings
  const warnings = new Warnings(MIN, () => clock.at, (fire) => { timers.push(fire) })
  const idem = createIdempotency({ store, inFlightTtlMs: 1000, log, warnings })
  return { idem, lines, clock, timers }
}

t.test('a different failure inside the minute after an outage line is never told as itself', async (t) => {
  const timeout = async (): Promise<boolean> => { throw new Error('Command timed out') }
  // Our own bug on one rare path: before cf51a4e, its own line with its message.
  const bug = (): Promise<boolean> => { throw new TypeError("Cannot read properties of undefined (reading 'statusCode')") }
  const { idem, lines, clock } = harness([timeout, bug, timeout])
  const cancel = fakeCancel()
  await idem.handle(keyed(cancel, 'k1', `${APPOINTMENT}-1`))
  clock.at = 10_000
  await idem.handle(keyed(cancel, 'k2', `${APPOINTMENT}-2`))
  clock.at = 61_000
  await idem.handle(keyed(cancel, 'k3', `${APPOINTMENT}-3`))
  t.equal(cancel.sends(), 3)
  const told = lines.map(({ fields }) => (fields.err as { type: string }).type)
  t.ok(told.includes('TypeError'), `the TypeError is told (lines: ${JSON.stringify(lines)})`)
})

t.test('a burst shorter than the minute: its count is told when the minute ends, not charged to the next failure days later', async (t) => {
  const timeout = async (): Promise<boolean> => { throw new Error('Command timed out') }
  const { idem, lines, clock, timers } = harness([timeout, timeout, timeout, timeout])
  const cancel = fakeCancel()
  for (let i = 0; i < 3; i++) {
    clock.at = i * 1000
    await idem.handle(keyed(cancel, `k${i}`, `${APPOINTMENT}-${i}`))
  }
  t.equal(lines.length, 1, 'the burst: one line (the two others left out)')
  // The minute ends with nothing more: the two left out are told then.
  clock.at = MIN + 2000
  for (const fire of timers.splice(0)) fire()
  t.match(lines[1], { fields: { repeats: 2 }, message: 'idempotency store write failed' }, `the burst's count, told as its minute ends (lines: ${JSON.stringify(lines)})`)
  clock.at = 24 * 60 * MIN
  await idem.handle(keyed(cancel, 'next-day', `${APPOINTMENT}-next-day`))
  const last = lines.at(-1) as { fields: Record<string, unknown> }
  t.equal(last.fields.repeats, undefined, `a day later, one failure: the line does not claim yesterday's two (fields: ${JSON.stringify(last.fields)})`)
})
