import t from 'tap'
import { createOwnershipCache, listedIdOf, type OwnershipCache, type OwnershipCacheOptions } from '../../src/appointments/ownership.js'
import type { Appointment } from '../../src/care360/client.js'

const item = (id: string): Appointment => ({ id, agentEventId: null, title: null, topic: null, start: null, end: null, status: null, agentName: null })

/**
 * A cache and `seed`, which stores a list for a patient as GET /appointments does (through
 * `list`), from a fetch that answers it without reaching the test's own `fetch`.
 */
function seeded (options: OwnershipCacheOptions): { cache: OwnershipCache, seed: (email: string, appointments: Appointment[]) => Promise<void> } {
  const seeds: Appointment[][] = []
  const cache = createOwnershipCache({ ...options, fetch: async (email, requestId) => seeds.shift() ?? await options.fetch(email, requestId) })
  return {
    cache,
    seed: async (email, appointments) => {
      seeds.push(appointments)
      await cache.list(email, 'seed')
    }
  }
}

t.test('the cache is bounded: the least recently stored patient is evicted first', async (t) => {
  let clock = 0
  const fetched: string[] = []
  const { cache, seed } = seeded({
    maxEntries: 2,
    now: () => clock,
    fetch: async (email) => { fetched.push(email); return [item(`${email}-1`)] }
  })
  await seed('a@example.com', [item('a-1')])
  await seed('b@example.com', [item('b-1')])
  await seed('c@example.com', [item('c-1')])
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
  const { cache, seed } = seeded({ fetch: async (email) => { fetched.push(email); return [] } })
  const [first, second] = [item('a-1'), item('a-2')]
  await seed('a@example.com', [first, second])
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
  const { cache, seed } = seeded({ now: () => clock, fetch: async () => { fetches += 1; return [] } })
  const cachedHas = async (id: string): Promise<boolean> => {
    const before = fetches
    const found = await cache.find('a@example.com', id, 'r')
    return found !== null && fetches === before
  }
  // A lookup that misses the cache stores the upstream's empty list: each absence is checked last.
  const [first, second] = [item('a-1'), item('a-2')]
  await seed('a@example.com', [first, second])
  // A GET /appointments fetched before the cancel landed stored its list (other objects) while
  // the cancel ran: the cancel still drops its appointment.
  await seed('a@example.com', [item('a-1'), item('a-2')])
  cache.cancelled('a@example.com', first)
  t.ok(await cachedHas('a-2'))
  t.notOk(await cachedHas('a-1'), 'dropped by id')
  // Lists fetched before a cancel, stored after it.
  const stale = () => [item('a-1'), item('a-2'), item('a-3')]
  await seed('A@example.com', stale())
  t.ok(await cachedHas('a-3'), 'the rest of the list is kept')
  t.notOk(await cachedHas('a-1'), 'a list stored after the cancel does not bring it back')
  cache.cancelled('a@example.com', second)
  await seed('a@example.com', stale())
  t.notOk(await cachedHas('a-2'), 'nor the later one')
  await seed('a@example.com', stale())
  t.notOk(await cachedHas('a-1'), 'nor the earlier one')
  clock += 30_000
  await seed('a@example.com', stale())
  t.ok(await cachedHas('a-1'), 'once a cached list can no longer be older than the cancel, lists are taken as they come')
})

t.test('an appointment that ended since its list was cached is looked up fresh, not taken from the cache', async (t) => {
  let clock = Date.parse('2031-01-01T10:59:50Z')
  const fetched: string[] = []
  const ending = { ...item('a-1'), end: '2031-01-01T11:00:00Z' }
  const later = { ...item('a-2'), end: '2031-01-02T11:00:00Z' }
  const undated = { ...item('a-3'), end: 'soon' }
  const { cache, seed } = seeded({ now: () => clock, fetch: async (email) => { fetched.push(email); return [later, undated] } })
  await seed('a@example.com', [ending, later, undated])
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

t.test('a list fetched before an outcome that may have cancelled is not kept after it: the next cancel looks afresh', async (t) => {
  const fetched: string[] = []
  let release: (list: Appointment[]) => void = () => {}
  const cache = createOwnershipCache({
    fetch: async (email) => {
      fetched.push(email)
      return await new Promise<Appointment[]>((resolve) => { release = resolve })
    }
  })
  // A GET /appointments is under way when a cancel of a-1 times out (it may have taken effect).
  const listing = cache.list('a@example.com', 'r-list')
  cache.forget('A@example.com')
  release([item('a-1'), item('a-2')])
  t.same(await listing, [item('a-1'), item('a-2')], 'its request gets the list it fetched')
  const lookup = cache.find('a@example.com', 'a-1', 'r-cancel')
  t.same(fetched, ['a@example.com', 'a@example.com'], 'the next cancel fetched afresh: the list was not kept')
  release([item('a-2')])
  t.same(await lookup, null, 'and the upstream no longer lists a-1')
  // A list fetched after the forget is kept as usual, as is one of another patient begun before it.
  t.same(await cache.find('a@example.com', 'a-2', 'r-next'), item('a-2'), 'from the cache')
  t.same(fetched.length, 2)
  const other = cache.list('b@example.com', 'r-b')
  cache.forget('a@example.com')
  release([item('b-1')])
  await other
  t.same(await cache.find('b@example.com', 'b-1', 'r-b2'), item('b-1'), "another patient's list is kept")
  t.same(fetched.length, 3)
})

t.test('the forgets are bounded too; a patient whose forget was evicted is taken to have the latest evicted one', async (t) => {
  const fetched: string[] = []
  const releases: Array<(list: Appointment[]) => void> = []
  let hold = true
  const cache = createOwnershipCache({
    maxEntries: 2,
    fetch: async (email) => {
      fetched.push(email)
      return hold ? await new Promise<Appointment[]>((resolve) => { releases.push(resolve) }) : [item('x-1')]
    }
  })
  const before = cache.list('a@example.com', 'r-a')
  const unrelated = cache.list('d@example.com', 'r-d')
  cache.forget('a@example.com')
  // Two more forgets evict a's.
  cache.forget('b@example.com')
  cache.forget('c@example.com')
  const after = cache.list('a@example.com', 'r-a2')
  hold = false
  for (const release of releases) release([item('x-1')])
  await Promise.all([before, unrelated, after])
  const lookups = fetched.length
  await cache.find('d@example.com', 'x-1', 'r')
  t.equal(fetched.length, lookups + 1, "d's list, begun before an evicted forget, was not kept (it might have been d's)")
  await cache.find('a@example.com', 'x-1', 'r')
  t.equal(fetched.length, lookups + 1, "a's list begun after every forget was kept")
})

t.test('a forget evicted leaves behind only itself: a list begun after it (and before a later forget of another patient) is kept', async (t) => {
  const fetched: string[] = []
  let release: ((list: Appointment[]) => void) | null = null
  const cache = createOwnershipCache({
    maxEntries: 2,
    // The first fetch is held until released; any later one answers at once.
    fetch: async (email) => {
      fetched.push(email)
      if (release !== null) return [item('d-1')]
      return await new Promise<Appointment[]>((resolve) => { release = resolve })
    }
  })
  cache.forget('a@example.com')
  cache.forget('b@example.com')
  // d's list begins after the second forget; the third evicts the first, the latest evicted.
  const listing = cache.list('d@example.com', 'r-d')
  cache.forget('c@example.com')
  release!([item('d-1')])
  await listing
  t.same(await cache.find('d@example.com', 'd-1', 'r'), item('d-1'))
  t.same(fetched, ['d@example.com'], "from the cache: d's list began after every evicted forget")
})

t.test('a patient forgotten again goes to the back of the forgets: evicted in the order they were last made, none later than one kept', async (t) => {
  const fetched: string[] = []
  let release: ((list: Appointment[]) => void) | null = null
  const cache = createOwnershipCache({
    maxEntries: 3,
    // The first fetch is held until released; any later one answers at once.
    fetch: async (email) => {
      fetched.push(email)
      if (release !== null) return [item('a-2')]
      return await new Promise<Appointment[]>((resolve) => { release = resolve })
    }
  })
  cache.forget('a@example.com')
  cache.forget('b@example.com')
  // a's list begins after the first two forgets, before a is forgotten again (the third).
  const listing = cache.list('a@example.com', 'r-a')
  cache.forget('a@example.com')
  // Three more forgets evict b's (the second), then a's (the third), in that order.
  cache.forget('c@example.com')
  cache.forget('d@example.com')
  cache.forget('e@example.com')
  release!([item('a-1'), item('a-2')])
  await listing
  t.same(await cache.find('a@example.com', 'a-1', 'r'), null, 'a-1 is looked up afresh: the upstream no longer lists it')
  t.same(fetched, ['a@example.com', 'a@example.com'], "a's list, begun before a's last forget, was not kept")
})
