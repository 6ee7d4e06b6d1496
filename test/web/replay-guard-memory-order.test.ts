import t from 'tap'
import { createReplayGuard } from '../../src/web/replay-guard.js'

/**
 * The memory replay guard (no Redis) holds 10 000 ids and, full of live ones, drops the oldest
 * claim. An id claimed again after its claim expired is the newest claim: it must not be the one
 * dropped because it was first claimed long ago (a Map keeps a key's first place on `set`). A
 * retired ID token so dropped could sign in again, a logout token be replayed.
 */
t.test('memory: an id claimed again after its claim expired counts as the newest, not the oldest', async (t) => {
  let now = 0
  const guard = createReplayGuard({ redis: null }, () => now)
  t.ok(await guard.claim('early', 10))
  for (let i = 0; i < 5_000; i++) await guard.claim(`id-${i}`, 1_000_000)
  now = 100
  // Long expired: claimed afresh (after 5 000 others), then used.
  t.ok(await guard.claim('early', 1_000_000))
  await guard.markUsed('early')
  for (let i = 5_000; i < 9_999; i++) await guard.claim(`id-${i}`, 1_000_000)
  // Full of live claims: the next one drops the oldest live claim, 'id-0'.
  now = 200
  t.ok(await guard.claim('late', 1_000_000))
  t.ok(await guard.used('early'), 'the id claimed afresh and used is still a replay')
  t.notOk(await guard.claim('early', 1_000_000), 'so its claim is refused')
})
