import t from 'tap'
import { parseHttpDate, parseRetryAfter } from '../../src/care360/client.js'

/**
 * RFC 9110 5.6.7: a recipient "MUST interpret a timestamp that appears to be more than 50 years in
 * the future as representing the most recent year in the past that had the same last two digits".
 * The rule is about the timestamp, not its year alone: on 2026-12-07, "31-Dec-76" is 2076-12-31,
 * 50 years and 24 days ahead, so it is 1976. Reading the year by the years alone (the latest year
 * ending in 76 not after 2026 + 50) takes it for 2076: a Retry-After in the past (no wait) becomes
 * the clamp's full 10 minutes of cooldown for every replica.
 */

const NOW = Date.parse('2026-12-07T09:00:00Z')

t.test('an RFC 850 date more than 50 years ahead, within the year 50 years ahead, is a century back', async (t) => {
  t.equal(parseHttpDate('Friday, 31-Dec-76 23:59:59 GMT', NOW), Date.parse('1976-12-31T23:59:59Z'), '2076-12-31 is more than 50 years after 2026-12-07')
  t.equal(parseHttpDate('Tuesday, 08-Dec-76 09:00:00 GMT', NOW), Date.parse('1976-12-08T09:00:00Z'), 'one day past 50 years')
  t.equal(parseHttpDate('Monday, 07-Dec-76 09:00:01 GMT', NOW), Date.parse('1976-12-07T09:00:01Z'), 'one second past 50 years')
  t.equal(parseRetryAfter('Friday, 31-Dec-76 23:59:59 GMT', NOW), 0, 'a Retry-After in the past: no wait, not the 10-minute clamp')

  // Unchanged: at most 50 years ahead is ahead; the other two forms are read as written.
  t.equal(parseHttpDate('Saturday, 07-Dec-76 09:00:00 GMT', NOW), Date.parse('2076-12-07T09:00:00Z'), 'exactly 50 years ahead')
  t.equal(parseHttpDate('Wednesday, 01-Jan-76 00:00:00 GMT', NOW), Date.parse('2076-01-01T00:00:00Z'), 'less than 50 years ahead')
  t.equal(parseHttpDate('Tuesday, 07-Dec-77 09:00:00 GMT', NOW), Date.parse('1977-12-07T09:00:00Z'))
  t.equal(parseHttpDate('Friday, 01-Jan-27 00:00:00 GMT', NOW), Date.parse('2027-01-01T00:00:00Z'))
  t.equal(parseHttpDate('Thursday, 31-Dec-99 23:59:59 GMT', NOW), Date.parse('1999-12-31T23:59:59Z'))
  t.equal(parseHttpDate('Saturday, 01-Jan-00 00:00:00 GMT', NOW), Date.parse('2000-01-01T00:00:00Z'))
  t.equal(parseHttpDate('Thu, 31 Dec 2076 23:59:59 GMT', NOW), Date.parse('2076-12-31T23:59:59Z'), 'IMF-fixdate: the year as written')
  t.equal(parseHttpDate('Thu Dec 31 23:59:59 2076', NOW), Date.parse('2076-12-31T23:59:59Z'), 'asctime: the year as written')
  // On 29 February, 50 years later has no 29 February: the 1st of March is beyond it.
  const leap = Date.parse('2028-02-29T12:00:00Z')
  t.equal(parseHttpDate('Saturday, 28-Feb-78 12:00:00 GMT', leap), Date.parse('2078-02-28T12:00:00Z'), 'before 50 years from a 29 February')
  t.equal(parseHttpDate('Wednesday, 02-Mar-78 12:00:00 GMT', leap), Date.parse('1978-03-02T12:00:00Z'), 'after 50 years from a 29 February')
})

t.test('the 50 years end at now\'s minute and second, not at its hour', async (t) => {
  // Half past nine and 30.5 s: a timestamp at most 50 years later, to the second, is ahead.
  const now = Date.parse('2026-12-07T09:30:30.500Z')
  t.equal(parseHttpDate('Monday, 07-Dec-76 09:30:30 GMT', now), Date.parse('2076-12-07T09:30:30Z'), 'within the second 50 years on: ahead')
  t.equal(parseHttpDate('Monday, 07-Dec-76 09:30:31 GMT', now), Date.parse('1976-12-07T09:30:31Z'), 'the next second: a century back')
  t.equal(parseHttpDate('Monday, 07-Dec-76 09:15:00 GMT', now), Date.parse('2076-12-07T09:15:00Z'), 'a quarter hour short: ahead')
})
