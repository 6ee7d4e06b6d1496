import type { FastifyInstance, onResponseHookHandler } from 'fastify'

/**
 * Runs a hook after every answer: appended to each route's own onResponse hooks when the route
 * is added (so it runs after them, and knows the route's pattern without reading
 * `request.routeOptions`, a fresh object on every access), and from one global hook for the
 * requests no route matched, with `hookFor(null)`. Register it before any route.
 */
export function afterEveryAnswer (app: FastifyInstance, hookFor: (route: string | null) => onResponseHookHandler): void {
  app.addHook('onRoute', function appendAfterAnswer (route) {
    route.onResponse = [route.onResponse ?? [], hookFor(route.url)].flat()
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
