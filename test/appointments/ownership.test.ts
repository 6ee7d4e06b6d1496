import t from 'tap'
import { createOwnershipCache, listedIdOf } from '../../src/appointments/ownership.js'
import type { Appointment } from '../../src/care360/client.js'

const item = (id: string): Appointment => ({ id, agentEventId: null, title: null, topic: null, start: null, end: null, status: null, agentName: null })

t.test('the cache is bounded: the least recently stored patient is evicted first', async (t) => {
  let clock = 0
  const fetched: string[] = []
  const cache = createOwnershipCache({
    maxEntries: 2,
    now: () => clock,
    fetch: async (email) => { fetched.push(email); return [item(`${email}-1`)] }
  })
  cache.remember('a@example.com', [item('a-1')])
  cache.remember('b@example.com', [item('b-1')])
  cache.remember('c@example.com', [item('c-1')])
  t.same(await cache.find('B@example.com', 'B-1', 'r'), item('b-1'), 'cached, any case')
  t.same(fetched, [])
  t.same(await cache.find('a@example.com', 'a-1', 'r'), null, 'a was evicted: fetched fresh, and it is not there')
  t.same(fetched, ['a@example.com'])
  clock += 30_000
  await cache.find('c@example.com', 'c-1', 'r')
  t.same(fetched, ['a@example.com', 'c@example.com'], 'an expired entry is fetched again')
})

t.test('a cancel that took effect drops that appointment from the cached list, and only that one', async (t) => {
  const fetched: string[] = []
  const cache = createOwnershipCache({ fetch: async (email) => { fetched.push(email); return [] } })
  const [first, second] = [item('a-1'), item('a-2')]
  cache.remember('a@example.com', [first, second])
  cache.cancelled('A@example.com', first)
  t.same(await cache.find('a@example.com', 'a-2', 'r'), second, 'the other one is still served from the cache')
  t.same(fetched, [])
  t.same(await cache.find('a@example.com', 'a-1', 'r'), null, 'the cancelled one is looked up fresh')
  t.same(fetched, ['a@example.com'])
  cache.cancelled('nobody@example.com', first)
  t.same(await cache.find('nobody@example.com', 'a-1', 'r'), null, 'a patient with no cached list stays without one')
})

t.test('a cancelled appointment stays out of lists fetched before its cancel took effect, for as long as a list is cached', async (t) => {
  let clock = 0
  let fetches = 0
  // The upstream no longer lists anything: a lookup that misses the cache finds nothing.
  const cache = createOwnershipCache({ now: () => clock, fetch: async () => { fetches += 1; return [] } })
  const cachedHas = async (id: string): Promise<boolean> => {
    const before = fetches
    const found = await cache.find('a@example.com', id, 'r')
    return found !== null && fetches === before
  }
  // A lookup that misses the cache stores the upstream's empty list: each absence is checked last.
  const [first, second] = [item('a-1'), item('a-2')]
  cache.remember('a@example.com', [first, second])
  // A GET /appointments fetched before the cancel landed stored its list (other objects) while
  // the cancel ran: the cancel still drops its appointment.
  cache.remember('a@example.com', [item('a-1'), item('a-2')])
  cache.cancelled('a@example.com', first)
  t.ok(await cachedHas('a-2'))
  t.notOk(await cachedHas('a-1'), 'dropped by id')
  // Lists fetched before a cancel, stored after it.
  const stale = () => [item('a-1'), item('a-2'), item('a-3')]
  cache.remember('A@example.com', stale())
  t.ok(await cachedHas('a-3'), 'the rest of the list is kept')
  t.notOk(await cachedHas('a-1'), 'a list stored after the cancel does not bring it back')
  cache.cancelled('a@example.com', second)
  cache.remember('a@example.com', stale())
  t.notOk(await cachedHas('a-2'), 'nor the later one')
  cache.remember('a@example.com', stale())
  t.notOk(await cachedHas('a-1'), 'nor the earlier one')
  clock += 30_000
  cache.remember('a@example.com', stale())
  t.ok(await cachedHas('a-1'), 'once a cached list can no longer be older than the cancel, lists are taken as they come')
})

t.test('an appointment that ended since its list was cached is looked up fresh, not taken from the cache', async (t) => {
  let clock = Date.parse('2031-01-01T10:59:50Z')
  const fetched: string[] = []
  const ending = { ...item('a-1'), end: '2031-01-01T11:00:00Z' }
  const later = { ...item('a-2'), end: '2031-01-02T11:00:00Z' }
  const undated = { ...item('a-3'), end: 'soon' }
  const cache = createOwnershipCache({ now: () => clock, fetch: async (email) => { fetched.push(email); return [later, undated] } })
  cache.remember('a@example.com', [ending, later, undated])
  t.same(await cache.find('a@example.com', 'a-1', 'r'), ending, 'still upcoming: from the cache')
  clock += 10_000
  t.same(await cache.find('a@example.com', 'a-1', 'r'), null, 'ended at its end: asked again, and the upstream no longer lists it')
  t.same(fetched, ['a@example.com'])
  t.same(await cache.find('a@example.com', 'a-3', 'r'), undated, 'an end that cannot be read is not taken for ended')
  t.same(fetched, ['a@example.com'])
})

t.test('an appointment is named by its id or its agentEventId, in any case, and forwarded as the upstream spells it', async (t) => {
  const listed: Appointment = { ...item('5A9E0C1B-0000-4000-8000-000000000001'), agentEventId: 'EVT-Abc-1' }
  t.equal(listedIdOf(listed, '5a9e0c1b-0000-4000-8000-000000000001'), '5A9E0C1B-0000-4000-8000-000000000001')
  t.equal(listedIdOf(listed, 'evt-abc-1'), 'EVT-Abc-1', 'by its agentEventId')
  t.equal(listedIdOf(listed, 'evt-abc-2'), null)
  const cache = createOwnershipCache({ fetch: async () => [listed] })
  t.same(await cache.find('a@example.com', 'EVT-ABC-1', 'r'), listed, 'found by its agentEventId')
})
