import type { Redis } from 'ioredis'

export type ScriptArg = string | number

/** `variable`: the caller passes the number of keys first, as EVAL takes it. */
type KeyCount = number | 'variable'

interface Script { name: string, numberOfKeys: KeyCount, lua: string }

/** Every script of the service, registered as its module loads (before any client exists). */
const scripts = new Map<string, Script>()

/**
 * A Lua script as a typed function on a client. On the shared client (createSharedState) every
 * script is an ioredis command from the start (`defineScripts`): EVALSHA, falling back to EVAL on
 * NOSCRIPT (a restarted or flushed Redis). Nothing is defined while commands are in flight: with
 * ioredis's auto-pipelining, a command defined after a pipeline opened is missing from it and the
 * process crashed (reproduced; BENCHMARKS.md). A client without the definitions (a test's own)
 * gets a plain EVAL instead.
 */
export function redisScript (name: string, numberOfKeys: KeyCount, lua: string): (redis: Redis, ...args: ScriptArg[]) => Promise<unknown> {
  if (scripts.has(name)) throw new Error(`Redis script ${name} is defined twice`)
  scripts.set(name, { name, numberOfKeys, lua })
  return function runScript (redis, ...args) {
    const command = (redis as unknown as Record<string, ((...args: ScriptArg[]) => Promise<unknown>) | undefined>)[name]
    if (command === undefined) return numberOfKeys === 'variable' ? redis.eval(lua, ...(args as [number, ...ScriptArg[]])) : redis.eval(lua, numberOfKeys, ...args)
    return command.apply(redis, args)
  }
}

/** Makes every registered script a command of `redis`; called once, as the client is created. */
export function defineScripts (redis: Redis): void {
  for (const { name, numberOfKeys, lua } of scripts.values()) redis.defineCommand(name, numberOfKeys === 'variable' ? { lua } : { numberOfKeys, lua })
}

/**
 * `clock_ms(given)`: the milliseconds a test passes as a script's argument, or, when it passes ''
 * (the service always does), Redis's own clock, so that every replica measures against one clock.
 * Scores stay below 2^53 and print exactly with `int` (%.0f; Lua's tostring would use %.14g).
 */
export const LUA_CLOCK_MS = `
local function int (n) return string.format('%.0f', n) end
local function clock_ms (given)
  if given ~= '' then return tonumber(given) end
  local clock = redis.call('TIME')
  return tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
end
`

/** `now`: milliseconds on Redis's own clock (LUA_CLOCK_MS), with `int`. */
export const LUA_NOW_MS = `${LUA_CLOCK_MS}local now = clock_ms('')
`

/** A script's integer array answer. */
export function integers (reply: unknown, length: number): number[] {
  if (!Array.isArray(reply) || reply.length !== length) throw new TypeError('unexpected script reply')
  return reply.map((value) => Number(value))
}
