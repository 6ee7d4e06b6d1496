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
