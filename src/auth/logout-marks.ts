import type { SharedState } from '../state/redis.js'
import { redisScript } from '../state/redis-script.js'
import { sessionCommand } from './session-store.js'

/**
 * Remembers the IdP's back-channel logouts (by IdP session or by subject) for as long as an ID
 * token from before them could still be accepted, so that `POST /auth/session` and the web
 * callback refuse such a token instead of turning it into a session the logout never saw. In Redis
 * when the service has it: a logout delivered to one replica holds on all of them.
 *
 * Ids are hashes made by the caller (src/auth/id-token.ts): no sid or subject is kept in clear.
 */
export interface LogoutMarks {
  /**
   * Marks `id` logged out at `at` (seconds, the IdP's clock) for `ttlMs`. A later logout of the
   * same id moves the mark on; an earlier one changes nothing (the later mark already covers
   * every token the earlier one would, for as long).
   */
  mark: (id: string, at: number, ttlMs: number) => Promise<void>
  /** The time of the latest logout marked for `id` while its mark lasts, else null: a look, which writes nothing. */
  markedAt: (id: string) => Promise<number | null>
}

const MAX_REMEMBERED = 10_000
export const LOGOUT_MARK_PREFIX = 'bff:logout:'

/** KEYS[1] the id's key; ARGV[1] the logout time, ARGV[2] the mark's time to live (ms). */
const markScript = redisScript('bffLogoutMark', 1, `
local at = tonumber(redis.call('GET', KEYS[1]))
if at and at >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
`)

export function createLogoutMarks (sharedState: Pick<SharedState, 'redis'> & Partial<Pick<SharedState, 'degradeFor'>>, now: () => number = Date.now): LogoutMarks {
  const redis = sharedState.redis
  if (redis !== null) {
    return {
      // Like the replay guard: an honest 503, never a per-process mark other replicas lack.
      mark: async (id, at, ttlMs) => { await sessionCommand(sharedState, async () => await markScript(redis, `${LOGOUT_MARK_PREFIX}${id}`, at, ttlMs)) },
      async markedAt (id) {
        const value = await sessionCommand(sharedState, async () => await redis.get(`${LOGOUT_MARK_PREFIX}${id}`))
        return value === null ? null : Number(value)
      }
    }
  }
  const marks = new Map<string, { at: number, until: number }>()
  return {
    async mark (id, at, ttlMs) {
      const time = now()
      const entry = marks.get(id)
      if (entry !== undefined && entry.until > time && entry.at >= at) return
      // Bounded memory: expired marks go first; a flood of fresh ones drops the oldest. Set anew,
      // not updated in place: the map's order stays the order of the marks' last writes.
      marks.delete(id)
      if (marks.size >= MAX_REMEMBERED) {
        for (const [key, { until }] of marks) if (until <= time) marks.delete(key)
        if (marks.size >= MAX_REMEMBERED) marks.delete(marks.keys().next().value as string)
      }
      marks.set(id, { at, until: time + ttlMs })
    },
    async markedAt (id) {
      const entry = marks.get(id)
      return entry !== undefined && entry.until > now() ? entry.at : null
    }
  }
}
