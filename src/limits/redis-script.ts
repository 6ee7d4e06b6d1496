import type { Redis } from 'ioredis'

export type ScriptArg = string | number

/**
 * A Lua script as a typed function on a client. ioredis' defineCommand sends EVALSHA and falls
 * back to EVAL on NOSCRIPT (a restarted or flushed Redis), so scripts survive a Redis restart.
 */
export function redisScript (name: string, numberOfKeys: number, lua: string): (redis: Redis, ...args: ScriptArg[]) => Promise<unknown> {
  return async function runScript (redis, ...args) {
    const commands = redis as unknown as Record<string, ((...args: ScriptArg[]) => Promise<unknown>) | undefined>
    if (typeof commands[name] !== 'function') redis.defineCommand(name, { numberOfKeys, lua })
    return await (commands[name] as (...args: ScriptArg[]) => Promise<unknown>).apply(redis, args)
  }
}

/**
 * Milliseconds on Redis's own clock, so that every replica measures windows against one clock.
 * Scores stay below 2^53 and print exactly with %.0f (Lua's tostring would use %.14g).
 */
export const LUA_NOW_MS = `
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function int (n) return string.format('%.0f', n) end
`

/** A script's integer array answer. */
export function integers (reply: unknown, length: number): number[] {
  if (!Array.isArray(reply) || reply.length !== length) throw new TypeError('unexpected script reply')
  return reply.map((value) => Number(value))
}
