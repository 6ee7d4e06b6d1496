import t from 'tap'
import { createOwnershipCache } from '../../src/appointments/ownership.js'
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
