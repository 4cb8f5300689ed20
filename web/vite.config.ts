import { defineConfig } from "vite";

// The client is a static bundle: `npm run build` writes web/dist/, served as is (any path).
export default defineConfig({
  base: "./",
  build: {
    outDir: "dist",
    emptyOutDir: true,
    target: "es2022",
    sourcemap: false,
    chunkSizeWarningLimit: 4096,
  },
  worker: { format: "es" },
});
