import t from 'tap'
import { RepeatedWarnings, TroubleNotice } from '../../src/state/notice.js'

t.test('RepeatedWarnings: the first line, then one per interval and message with the count left out', async (t) => {
  let clock = 0
  const warnings = new RepeatedWarnings(1000, () => clock)
  const lines: Array<[object, string]> = []
  const log = { warn: (fields: object, message: string) => { lines.push([fields, message]) } }
  for (let i = 0; i < 5; i++) warnings.warn(log, { n: i }, 'store down')
  warnings.warn(log, { n: 0 }, 'other')
  t.same(lines, [[{ n: 0 }, 'store down'], [{ n: 0 }, 'other']])
  clock = 999
  warnings.warn(log, { n: 5 }, 'store down')
  t.equal(lines.length, 2, 'not before the interval')
  clock = 1000
  warnings.warn(log, { n: 6 }, 'store down')
  t.same(lines[2], [{ n: 6, repeats: 5 }, 'store down'], 'the five left out since the last line')
  clock = 5000
  warnings.warn(log, { n: 7 }, 'store down')
  t.same(lines[3], [{ n: 7 }, 'store down'], 'none left out: no count')
})

t.test('TroubleNotice: an all-clear after every line told, and once per interval after an untold break', async (t) => {
  let clock = 0
  const notice = new TroubleNotice(1000, () => clock)
  t.equal(notice.clear(), false, 'nothing told: no all-clear')
  t.equal(notice.clear(true), true, 'an untold break: one all-clear')
  clock = 500
  t.equal(notice.clear(true), false, '... per interval')
  t.equal(notice.tell(), true)
  t.equal(notice.tell(), false, 'one line per interval')
  t.equal(notice.clear(), true, 'after a line: the all-clear, whatever the interval')
  t.equal(notice.clear(), false, 'once')
  notice.told()
  t.equal(notice.tell(), false, 'a line told otherwise counts')
  t.equal(notice.clear(true), true)
})

t.test('RepeatedWarnings: kinds told apart under one message (at most 8), and the count left out told as its interval ends', async (t) => {
  let clock = 0
  const timers: Array<() => void> = []
  const warnings = new RepeatedWarnings(1000, () => clock, (fire) => { timers.push(fire) })
  const lines: Array<[object, string]> = []
  const log = { warn: (fields: object, message: string) => { lines.push([fields, message]) } }
  for (let i = 0; i < 12; i++) warnings.warn(log, { kind: i }, 'write failed', `Kind${i}`)
  t.same(lines.map(([fields]) => fields), [0, 1, 2, 3, 4, 5, 6, 7, 8].map((kind) => ({ kind })), 'eight kinds apart, the rest under the message alone (its first told)')
  lines.length = 0
  warnings.warn(log, { n: 1 }, 'store down')
  warnings.warn(log, { n: 2 }, 'store down')
  warnings.warn(log, { n: 3 }, 'store down')
  t.equal(timers.length, 2, 'one timer per message with some left out (the capped kinds, store down)')
  clock = 999
  timers.splice(1, 1)[0]?.()
  t.equal(lines.length, 1, 'not before the interval: waits again')
  clock = 1000
  for (const fire of timers.splice(0)) fire()
  t.same(lines.slice(1), [[{ kind: 11, repeats: 3 }, 'write failed'], [{ n: 3, repeats: 2 }, 'store down']], 'the counts, with the last fields')
  clock = 5000
  warnings.warn(log, { n: 4 }, 'store down')
  t.same(lines.at(-1), [{ n: 4 }, 'store down'], 'nothing charged to a later line')
})

t.test('RepeatedWarnings: a count told by the next line before its interval ends is not told again', async (t) => {
  let clock = 0
  const timers: Array<() => void> = []
  const warnings = new RepeatedWarnings(1000, () => clock, (fire) => { timers.push(fire) })
  const lines: object[] = []
  const log = { warn: (fields: object) => { lines.push(fields) } }
  warnings.warn(log, { n: 1 }, 'store down')
  clock = 100
  warnings.warn(log, { n: 2 }, 'store down')
  t.equal(timers.length, 1, 'left out: its interval ends at 1100')
  clock = 1000
  warnings.warn(log, { n: 3 }, 'store down')
  t.same(lines, [{ n: 1 }, { n: 3, repeats: 1 }], 'the line due at 1000 carries it')
  clock = 1100
  timers.splice(0)[0]?.()
  t.same(lines, [{ n: 1 }, { n: 3, repeats: 1 }], 'the timer finds nothing left to tell')
  t.equal(timers.length, 0, 'and schedules nothing more (a later timer would have nothing to write)')
})

t.test('TroubleNotice: after an untold break, the next all-clear is due a whole interval later, and then at once', async (t) => {
  let clock = 0
  const notice = new TroubleNotice(1000, () => clock)
  t.equal(notice.clear(true), true)
  clock = 999
  t.equal(notice.clear(true), false, 'not within the interval')
  clock = 1000
  t.equal(notice.clear(true), true, 'at its end')
})

t.test('RepeatedWarnings: every interval\'s count left out is told as it ends, by a timer of one interval', async (t) => {
  let clock = 0
  const timers: Array<{ fire: () => void, ms: number }> = []
  const warnings = new RepeatedWarnings(1000, () => clock, (fire, ms) => { timers.push({ fire, ms }) })
  const lines: object[] = []
  const log = { warn: (fields: object) => { lines.push(fields) } }
  warnings.warn(log, { n: 1 }, 'store down')
  clock = 10
  warnings.warn(log, { n: 2 }, 'store down')
  t.same(timers.map(({ ms }) => ms), [1000], 'one timer, of the interval')
  clock = 1010
  timers.shift()?.fire()
  clock = 1020
  warnings.warn(log, { n: 3 }, 'store down')
  t.same(timers.map(({ ms }) => ms), [1000], 'left out again: another timer')
  clock = 2020
  timers.shift()?.fire()
  t.same(lines, [{ n: 1 }, { n: 2, repeats: 1 }, { n: 3, repeats: 1 }])
})
