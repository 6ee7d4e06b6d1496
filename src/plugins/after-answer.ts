import type { IncomingMessage } from 'node:http'
import type { Socket } from 'node:net'
import type { FastifyInstance, FastifyReply, FastifyRequest, onResponseHookHandler, onSendHookHandler, RouteOptions } from 'fastify'
import type { ErrorCode } from '../errors.js'

/**
 * Runs a hook after every answer: `forRoute(pattern)`, appended to each route's own onResponse
 * hooks when the route is added (so it runs after them, and knows the route's pattern without
 * reading `request.routeOptions`, a fresh object on every access), and `notFound` from one global
 * hook for the requests no route matched (no hook when null). Register it before any route.
 */
export function afterEveryAnswer (app: FastifyInstance, forRoute: (route: string) => onResponseHookHandler, notFound: onResponseHookHandler | null): void {
  if (!watched.has(app)) {
    watched.add(app)
    app.addHook('onRoute', answerEvenWhenClientLeft)
  }
  app.addHook('onRoute', function appendAfterAnswer (route) {
    route.onResponse = appendHook(route.onResponse, forRoute(route.url))
  })
  if (notFound === null) return
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
 *
 * The same when the connection ends after onSend, before the answer finished: one cut off while
 * it was being written (a client that stopped reading, cut off by the server's timeout), and the
 * answers queued behind it (pipelined requests), which Node drops without a `close` of their own.
 * Fastify waits for `finish` or `error` and runs nothing; the connection's `close` runs the hooks
 * of each answer it leaves unfinished. One whose hooks began (the first of them takes it off the
 * connection's list) or that finished (Fastify runs them) is left alone.
 */
function answerEvenWhenClientLeft (route: RouteOptions): void {
  route.onResponse = appendHook(route.onResponse, function offTheConnection (request, _reply, done) {
    unfinished.get(request.raw.socket)?.delete(request)
    done()
  })
  function runHooks (app: FastifyInstance, request: FastifyRequest, reply: FastifyReply): void {
    // Answered on its socket outside Fastify, the request never had its route's answer sent (the
    // connection closed behind the first): its hooks report the answer its client got.
    const written = answeredOnSocket.get(request.raw)
    if (written !== undefined) {
      reply.code(written.statusCode)
      reply.errorCode = written.errorCode
    }
    // Never undefined by then: appendAfterAnswer gave every route its hooks.
    runInOrder(app, [route.onResponse as onResponseHookHandler | onResponseHookHandler[]].flat(), request, reply, 0)
  }
  const ifClientLeft: onSendHookHandler = function runAfterAnswerIfClientLeft (this: FastifyInstance, request, reply, payload, done) {
    // Its connection may be gone before Node gave this answer its socket (one queued behind
    // another, pipelined): the answer itself then looks alive.
    if (reply.raw.destroyed || request.raw.socket.destroyed) {
      runHooks(this, request, reply)
    } else {
      watchConnection(request.raw.socket).set(request, () => {
        // Finished: Fastify runs its hooks, perhaps still on their way here (an async hook first).
        if (!reply.raw.writableFinished) runHooks(this, request, reply)
      })
    }
    done(null, payload)
  }
  route.onSend = appendHook(route.onSend, ifClientLeft)
}

/** An error answer written for a request on its socket, outside Fastify, and why. */
export interface SocketAnswer {
  statusCode: number
  errorCode: ErrorCode
  /** The HTTP parser's error code (`HPE_INVALID_CHUNK_SIZE`, `ERR_HTTP_REQUEST_TIMEOUT`...). */
  parserError: string | undefined
}

/**
 * The requests a route was serving when Node's HTTP parser refused their body (broken, cut off,
 * too slow to arrive), answered on their socket (answers.ts, clientErrorAnswer). Their route then
 * fails to read the body and answers too, an answer that never goes out, since the first closed
 * the connection: it never finishes, and its hooks run here (runHooks), reporting this one. Looked
 * up only for an answer that did not go out, and in the access line of an error answer: never for
 * a request answered as usual.
 */
const answeredOnSocket = new WeakMap<IncomingMessage, SocketAnswer>()

/** `request` was answered `answer` on its socket: its route's after-answer hooks report that answer. */
export function answeredOutsideFastify (request: IncomingMessage, answer: SocketAnswer): void {
  answeredOnSocket.set(request, answer)
}

/** The answer written for `request` on its socket outside Fastify, if one was. */
export function socketAnswerOf (request: IncomingMessage): SocketAnswer | undefined {
  return answeredOnSocket.get(request)
}

/** Per connection, its answers past onSend that have not finished, with what runs their hooks. */
const unfinished = new WeakMap<Socket, Map<FastifyRequest, () => void>>()

function watchConnection (socket: Socket): Map<FastifyRequest, () => void> {
  let answers = unfinished.get(socket)
  if (answers === undefined) {
    const watched = new Map<FastifyRequest, () => void>()
    answers = watched
    unfinished.set(socket, watched)
    socket.once('close', function runUnfinished () {
      for (const run of watched.values()) run()
      watched.clear()
    })
  }
  return answers
}

/** The hooks one after the other, as Fastify runs them (each calls `done`, or its promise settles). */
function runInOrder (app: FastifyInstance, hooks: onResponseHookHandler[], request: FastifyRequest, reply: FastifyReply, from: number): void {
  const hook = hooks[from]
  if (hook === undefined) return
  const next = (): void => { runInOrder(app, hooks, request, reply, from + 1) }
  const settled = hook.call(app, request, reply, next) as unknown
  if (settled instanceof Promise) settled.then(next, next)
}
