import type { FastifyInstance, FastifyReply, FastifyRequest, onResponseHookHandler, onSendHookHandler, RouteOptions } from 'fastify'

/**
 * Runs a hook after every answer: appended to each route's own onResponse hooks when the route
 * is added (so it runs after them, and knows the route's pattern without reading
 * `request.routeOptions`, a fresh object on every access), and from one global hook for the
 * requests no route matched, with `hookFor(null)`. Register it before any route.
 */
export function afterEveryAnswer (app: FastifyInstance, hookFor: (route: string | null) => onResponseHookHandler): void {
  if (!watched.has(app)) {
    watched.add(app)
    app.addHook('onRoute', answerEvenWhenClientLeft)
  }
  app.addHook('onRoute', function appendAfterAnswer (route) {
    route.onResponse = appendHook(route.onResponse, hookFor(route.url))
  })
  const notFound = hookFor(null)
  app.addHook('onResponse', function afterNotFound (request, reply, done) {
    if (request.is404) {
      notFound.call(this, request, reply, done)
      return
    }
    done()
  })
}

const watched = new WeakSet<FastifyInstance>()

/** A route's hooks of one kind (none, one or several, as route options hold them) with `hook` last. */
export function appendHook<T> (hooks: T | T[] | undefined, hook: T): T[] {
  return [...(hooks === undefined ? [] : Array.isArray(hooks) ? hooks : [hooks]), hook]
}

/**
 * A client that closed its connection before its answer (a timeout of its own, a flaky network)
 * gets none, and Node never says the answer finished: Fastify then runs no onResponse hook, so the
 * request's after-answer work was lost though the request ran to its end (the cancel's audit
 * record, while the cancel may well have gone; its access line; its duration). Fastify still runs
 * onSend: there, such a request runs its route's onResponse hooks itself, read when it ends (so
 * with every hook the route was given, these included).
 */
function answerEvenWhenClientLeft (route: RouteOptions): void {
  const ifClientLeft: onSendHookHandler = function runAfterAnswerIfClientLeft (this: FastifyInstance, request, reply, payload, done) {
    // Never undefined by then: appendAfterAnswer gave every route its hooks.
    if (reply.raw.destroyed) runInOrder(this, [route.onResponse as onResponseHookHandler | onResponseHookHandler[]].flat(), request, reply, 0)
    done(null, payload)
  }
  route.onSend = appendHook(route.onSend, ifClientLeft)
}

/** The hooks one after the other, as Fastify runs them (each calls `done`, or its promise settles). */
function runInOrder (app: FastifyInstance, hooks: onResponseHookHandler[], request: FastifyRequest, reply: FastifyReply, from: number): void {
  const hook = hooks[from]
  if (hook === undefined) return
  const next = (): void => { runInOrder(app, hooks, request, reply, from + 1) }
  const settled = hook.call(app, request, reply, next) as unknown
  if (settled instanceof Promise) settled.then(next, next)
}
