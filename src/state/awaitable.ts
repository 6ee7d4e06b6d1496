/**
 * What a store answers: the value itself when the state is held in this process, a promise of it
 * when it lives in Redis.
 *
 * Every request passes several stores before its upstream call (per-client counters, the
 * session, the cooldown, the org budget, single flight). As async functions, each call cost a
 * promise and a turn of the microtask queue even when the answer was a Map lookup away, and those
 * turns were a measurable share of a cancel's CPU (BENCHMARKS.md). The memory stores answer at
 * once; callers wait only when there is something to wait for.
 *
 * Callers either `await` the answer (an async caller loses nothing) or branch with `isPromise`
 * and `whenReady` (Fastify's callback-style hooks, which stay synchronous for a memory store).
 * A synchronous store call may throw; an asynchronous one rejects.
 */
export type Awaitable<T> = T | Promise<T>

export function isPromise<T> (value: Awaitable<T>): value is Promise<T> {
  return value instanceof Promise
}

/**
 * `next(value)` at once when `value` is there, or once its promise resolves (a rejection passes
 * through, and so does a throw of `next`: synchronously, or as a rejection).
 */
export function whenReady<T, U> (value: Awaitable<T>, next: (value: T) => Awaitable<U>): Awaitable<U> {
  return isPromise(value) ? value.then(next) : next(value)
}
