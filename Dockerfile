# syntax=docker/dockerfile:1
# Build stage: dev dependencies, then the service bundled into one file (scripts/build.mjs).
FROM node:24.21.0-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json ./
COPY scripts/build.mjs ./scripts/build.mjs
COPY src ./src
RUN npm run build

# Development tools of docker-compose.yml only (Care360 sandbox, development IdP, demo page), run
# from the build stage's dev dependencies. Never deployed; the runtime stage below stays the last
# one, so a plain `docker build .` still produces the production image.
FROM build AS dev-tools
COPY demo ./demo
ENV NODE_ENV=development
USER 1000:1000
EXPOSE 4000 4010 5173
CMD ["node", "--import", "tsx", "demo/compose-tools.ts"]

# Runtime stage: the bundle only (every dependency is inside it: no node_modules), as a non-root
# user. package.json is there for "type": "module". The base image's npm, npx and corepack are
# removed: nothing here installs anything. The bundle's source map stays in the build stage.
# The user is numeric (the base image's node user, 1000:1000): Kubernetes' runAsNonRoot cannot
# check a name, and refuses to start an image whose USER is one unless runAsUser is set.
FROM node:24.21.0-bookworm-slim AS runtime
ENV NODE_ENV=production
RUN rm -rf /usr/local/lib/node_modules /usr/local/bin/npm /usr/local/bin/npx /usr/local/bin/corepack
WORKDIR /app
COPY package.json ./
COPY --from=build /app/dist/server.js ./dist/server.js
USER 1000:1000
EXPOSE 3000 9464
# No curl in the image: Node itself probes liveness, on the address the service listens on
# (loopback when it listens on every address).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["node", "-e", "const h=process.env.HOST||'0.0.0.0';const a=h==='0.0.0.0'||h==='::'?'127.0.0.1':h.includes(':')?'['+h+']':h;fetch('http://'+a+':'+(process.env.PORT||3000)+'/healthz').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"]
# Node runs as PID 1 directly, so SIGTERM reaches it (npm would swallow it) and graceful shutdown runs.
# As PID 1 it gets only the signals it handles: src/early-signals.ts handles them from the start.
CMD ["node", "--max-semi-space-size=4", "dist/server.js"]
