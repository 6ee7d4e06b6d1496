import t from 'tap'
import { parseHttpDate, parseRetryAfter } from '../../src/care360/client.js'

/**
 * RFC 850's date form has a two-digit year, and RFC 9110 5.6.7 says how to read it: a timestamp
 * that appears to be more than 50 years in the future is the most recent year in the past with the
 * same last two digits; any other is the year ahead or just behind. Date.parse reads 00-49 as
 * 20xx and 50-99 as 19xx whatever the date: from 2050 on, an upstream's Retry-After (or Date) in
 * that form for the current year is read as a century ago.
 */

t.test('an RFC 850 date\'s two-digit year is read by RFC 9110\'s 50-year rule', async (t) => {
  const in2050 = Date.parse('2050-06-01T00:00:00Z')
  t.equal(parseRetryAfter('Wednesday, 01-Jun-50 00:00:42 GMT', in2050), 42_000, 'in 2050, "50" is 2050, not 1950')
  const in2076 = Date.parse('2076-03-01T00:00:00Z')
  t.equal(parseRetryAfter('Sunday, 01-Mar-76 00:01:00 GMT', in2076), 60_000, 'in 2076, "76" is 2076')

  const in2026 = Date.parse('2026-12-07T09:00:00Z')
  t.equal(parseHttpDate('Sunday, 06-Nov-94 08:49:37 GMT', in2026), Date.parse('1994-11-06T08:49:37Z'), '"94": 2094 would be more than 50 years ahead')
  t.equal(parseHttpDate('Monday, 07-Dec-26 09:00:00 GMT', in2026), Date.parse('2026-12-07T09:00:00Z'), 'the current year')
  t.equal(parseHttpDate('Tuesday, 07-Dec-60 09:00:00 GMT', in2026), Date.parse('2060-12-07T09:00:00Z'), '"60" in 2026: 34 years ahead, not 66 behind')
  t.equal(parseHttpDate('Saturday, 07-Dec-76 09:00:00 GMT', in2026), Date.parse('2076-12-07T09:00:00Z'), '"76": exactly 50 years ahead is not more than 50')
  t.equal(parseHttpDate('Tuesday, 07-Dec-77 09:00:00 GMT', in2026), Date.parse('1977-12-07T09:00:00Z'), '"77": 2077 would be more than 50 years ahead')
  const in2099 = Date.parse('2099-12-01T00:00:00Z')
  t.equal(parseHttpDate('Saturday, 01-Dec-05 00:00:00 GMT', in2099), Date.parse('2105-12-01T00:00:00Z'), '"05" in 2099: six years ahead')
  t.equal(parseHttpDate('Sun, 06 Nov 1994 08:49:37 GMT', in2099), Date.parse('1994-11-06T08:49:37Z'), 'a four-digit year is the year')
})
