/* MVKE.APPLY: the event apply function of mvke/runtime/event_apply.py (APPLY_LIBRARY), compiled.
 *
 * The Lua function is the reference and runs on any Redis 7; this module does the same work without
 * the Lua interpreter, which was most of the function's cost (docs/results/events.md: ~104k
 * instructions per event inside FCALL, of which the Redis commands it calls are ~30k). Same keys,
 * same arguments after the rules, same writes, same reply; a test compares the hashes both write
 * over random event sequences (tests/runtime/test_native_apply.py).
 *
 *   MVKE.APPLY <user hash> <:ev hash> <:seen zset> <rules> <ttl> <now> <event>...
 *
 * <rules>: EventRules.to_native() (records separated by \x1e, fields by \x1f), parsed once and kept
 * while the next call brings the same text. Each event: id, order key as text, type, n, then n pairs
 * (list name, values joined by '|'). Reply: [applied, duplicate, late].
 *
 * Every write goes through RedisModule_Call with '!', so replicas and the AOF receive the effects
 * (HSET, ZADD, ...), not MVKE.APPLY: a Redis without the module can load them.
 *
 * Build: gcc -O2 -fPIC -shared -o mvke_apply.so mvke_apply.c (mvke/runtime/native_apply.py does it, into a cache directory).
 */
#include "redismodule.h"

#include <stdlib.h>
#include <string.h>
#include <stdio.h>

#define SEP '|'

typedef struct { const char *p; size_t n; } Str;

typedef struct {
    RedisModuleString *field, *tfield;   /* the history's field and its order keys' field in :ev */
    Str src;
    long long cap;
    int distinct, reversed;
    int on[3];                           /* impression, click, conversion */
} HistoryRule;

typedef struct { RedisModuleString *field; int on[3]; int slot; } CounterRule;   /* slot: the first rule of its field */

typedef struct {
    RedisModuleString *field;
    int num, den;                        /* counter indexes; den -1: a count, not a rate */
    int nedges;
    double *edges;
    RedisModuleString **labels;          /* nedges + 1 */
} BucketRule;

typedef struct {
    char *text; size_t len;              /* the text these rules were parsed from */
    long long dedup;
    int nh, nc, nb;
    HistoryRule *h; CounterRule *c; BucketRule *b;
    RedisModuleString **want;            /* HMGET of the user: _loaded_at, histories, counters */
    RedisModuleString **auxwant;         /* HMGET of :ev: base, t:<history>... */
    RedisModuleString *event_at, *base;
} Rules;

/* a few rule sets parsed (consumers of two bundles' rules during a rollout alternate), replaced in turn */
#define CACHED 4
static Rules *cached[CACHED];
static int next_slot = 0;

static int type_index(const char *p, size_t n) {
    if (n == 10 && !memcmp(p, "impression", 10)) return 0;
    if (n == 5 && !memcmp(p, "click", 5)) return 1;
    if (n == 10 && !memcmp(p, "conversion", 10)) return 2;
    return -1;
}

/* ---- the rules' text ------------------------------------------------------------------------ */
typedef struct { const char *p, *end; } Cursor;

static int next_token(Cursor *c, Str *out) {      /* up to the next \x1f or \x1e (a NUL is a character) */
    if (c->p > c->end) return 0;
    const char *s = c->p;
    while (c->p < c->end && *c->p != '\x1f' && *c->p != '\x1e') c->p++;
    out->p = s; out->n = (size_t)(c->p - s);
    return 1;
}

static RedisModuleString *kept(Str s) { return RedisModule_CreateString(NULL, s.p, s.n); }

static void free_rules(Rules *R) {
    if (!R) return;
    for (int i = 0; i < R->nb; i++) {
        if (R->b[i].labels)
            for (int j = 0; j <= R->b[i].nedges; j++) if (R->b[i].labels[j]) RedisModule_FreeString(NULL, R->b[i].labels[j]);
        RedisModule_Free(R->b[i].labels); RedisModule_Free(R->b[i].edges);
        if (R->b[i].field) RedisModule_FreeString(NULL, R->b[i].field);
    }
    for (int i = 0; i < R->nh; i++) { RedisModule_FreeString(NULL, R->h[i].field); RedisModule_FreeString(NULL, R->h[i].tfield); }
    for (int i = 0; i < R->nc; i++) if (R->c[i].field) RedisModule_FreeString(NULL, R->c[i].field);
    if (R->want) RedisModule_FreeString(NULL, R->want[0]);
    if (R->auxwant) RedisModule_FreeString(NULL, R->auxwant[0]);
    if (R->event_at) RedisModule_FreeString(NULL, R->event_at);
    RedisModule_Free(R->h); RedisModule_Free(R->c); RedisModule_Free(R->b);
    RedisModule_Free(R->want); RedisModule_Free(R->auxwant); RedisModule_Free(R->text);
    RedisModule_Free(R);
}

static void parse_types(Str s, int on[3]) {
    on[0] = on[1] = on[2] = 0;
    const char *p = s.p, *end = s.p + s.n;
    while (p < end) {
        const char *q = p;
        while (q < end && *q != ',') q++;
        int t = type_index(p, (size_t)(q - p));
        if (t >= 0) on[t] = 1;
        p = q + 1;
    }
}

static long long to_ll(Str s) { char buf[32]; size_t n = s.n < 31 ? s.n : 31; memcpy(buf, s.p, n); buf[n] = 0; return strtoll(buf, NULL, 10); }
static double to_d(Str s) { char buf[64]; size_t n = s.n < 63 ? s.n : 63; memcpy(buf, s.p, n); buf[n] = 0; return strtod(buf, NULL); }

static int counter_index(Rules *R, Str name) {
    for (int i = 0; i < R->nc; i++) {
        size_t n; const char *p = RedisModule_StringPtrLen(R->c[i].field, &n);
        if (n == name.n && !memcmp(p, name.p, n)) return i;
    }
    return -1;
}

/* Records: "k\x1f<dedup>", "h\x1f<field>\x1f<src>\x1f<cap>\x1f<distinct>\x1f<reversed>\x1f<types,>",
 * "c\x1f<field>\x1f<types,>", "b\x1f<field>\x1f<num>\x1f<den or empty>\x1f<n edges>\x1f<edge>...\x1f<label>..."
 * (all counters before the buckets). -> NULL when the text is not such rules. */
static Rules *parse_rules(const char *text, size_t len) {
    Rules *R = RedisModule_Calloc(1, sizeof(Rules));
    R->text = RedisModule_Alloc(len + 1); memcpy(R->text, text, len); R->text[len] = 0; R->len = len;
    int records = 1;
    for (size_t i = 0; i < len; i++) if (text[i] == '\x1e') records++;
    R->h = RedisModule_Calloc(records, sizeof(HistoryRule));
    R->c = RedisModule_Calloc(records, sizeof(CounterRule));
    R->b = RedisModule_Calloc(records, sizeof(BucketRule));
    Cursor c = {R->text, R->text + len};
#define FIELD(out) do { if (c.p >= c.end || *c.p != '\x1f') goto bad; c.p++; next_token(&c, &(out)); } while (0)
    while (c.p <= c.end) {
        Str kind, f[6];
        next_token(&c, &kind);
        if (kind.n != 1) goto bad;
        if (kind.p[0] == 'k') {
            FIELD(f[0]); R->dedup = to_ll(f[0]);
        } else if (kind.p[0] == 'h') {
            for (int i = 0; i < 6; i++) FIELD(f[i]);
            HistoryRule *h = &R->h[R->nh++];
            h->field = kept(f[0]);
            h->tfield = RedisModule_CreateString(NULL, "t:", 2);
            RedisModule_StringAppendBuffer(NULL, h->tfield, f[0].p, f[0].n);
            h->src = f[1]; h->cap = to_ll(f[2]); h->distinct = f[3].n && f[3].p[0] == '1';
            if (h->cap < 1) goto bad;
            h->reversed = f[4].n && f[4].p[0] == '1';
            parse_types(f[5], h->on);
        } else if (kind.p[0] == 'c') {
            for (int i = 0; i < 2; i++) FIELD(f[i]);
            int first = counter_index(R, f[0]);
            CounterRule *k = &R->c[R->nc];
            k->field = kept(f[0]); parse_types(f[1], k->on);
            k->slot = first >= 0 ? first : R->nc;
            R->nc++;
        } else if (kind.p[0] == 'b') {
            for (int i = 0; i < 4; i++) FIELD(f[i]);
            BucketRule *b = &R->b[R->nb++];
            b->field = kept(f[0]);
            b->num = counter_index(R, f[1]);
            b->den = f[2].n ? counter_index(R, f[2]) : -1;
            long long nedges = to_ll(f[3]);
            if (b->num < 0 || (f[2].n && b->den < 0) || nedges < 0 || nedges > (long long)(c.end - c.p)) goto bad;
            b->nedges = (int)nedges;
            b->edges = RedisModule_Calloc(b->nedges + 1, sizeof(double));
            b->labels = RedisModule_Calloc(b->nedges + 1, sizeof(RedisModuleString *));
            for (int i = 0; i < b->nedges; i++) { FIELD(f[4]); b->edges[i] = to_d(f[4]); }
            for (int i = 0; i <= b->nedges; i++) { FIELD(f[4]); b->labels[i] = kept(f[4]); }
        } else goto bad;
        if (c.p < c.end && *c.p != '\x1e') goto bad;
        c.p++;
    }
    /* one allocation of strings per list: want[0] / auxwant[0] are owned copies of the first names */
    R->want = RedisModule_Calloc(1 + R->nh + R->nc, sizeof(RedisModuleString *));
    R->want[0] = RedisModule_CreateString(NULL, "_loaded_at", 10);
    for (int i = 0; i < R->nh; i++) R->want[1 + i] = R->h[i].field;
    for (int i = 0; i < R->nc; i++) R->want[1 + R->nh + i] = R->c[i].field;
    R->auxwant = RedisModule_Calloc(1 + R->nh, sizeof(RedisModuleString *));
    R->auxwant[0] = RedisModule_CreateString(NULL, "base", 4);
    R->base = R->auxwant[0];
    for (int i = 0; i < R->nh; i++) R->auxwant[1 + i] = R->h[i].tfield;
    R->event_at = RedisModule_CreateString(NULL, "_event_at", 9);
    return R;
bad:
    free_rules(R);
    return NULL;
}

static Rules *rules_of(RedisModuleString *arg) {
    size_t len; const char *text = RedisModule_StringPtrLen(arg, &len);
    for (int i = 0; i < CACHED; i++)
        if (cached[i] && cached[i]->len == len && !memcmp(cached[i]->text, text, len)) return cached[i];
    Rules *R = parse_rules(text, len);
    if (!R) return NULL;
    free_rules(cached[next_slot]);       /* no call is running: Redis runs one command at a time */
    cached[next_slot] = R;
    next_slot = (next_slot + 1) % CACHED;
    return R;
}

/* ---- a history in a call: its entries as arrays -------------------------------------------- */
typedef struct {
    int loaded, dirty;
    size_t n, room;
    Str *v, *s;          /* values and the text of their order keys */
    double *o;           /* order keys */
} History;

static void reserve(History *st, size_t room) {
    if (room <= st->room) return;
    st->room = room * 2;
    st->v = RedisModule_Realloc(st->v, st->room * sizeof(Str));
    st->s = RedisModule_Realloc(st->s, st->room * sizeof(Str));
    st->o = RedisModule_Realloc(st->o, st->room * sizeof(double));
}

/* the parts of a '|'-joined text: empty ones skipped (keep_empty 0: an event's values, Lua's gmatch
 * '([^|]+)'), or kept (1: a stored list, entry for entry as Lua's `count` and the text path see it) */
static size_t split(Str t, Str **out, size_t *room, int keep_empty) {
    size_t n = 0;
    const char *p = t.p, *end = t.p + t.n;
    while (t.n && p <= end) {
        const char *q = memchr(p, SEP, (size_t)(end - p));
        if (!q) q = end;
        if (q > p || keep_empty) {
            if (n == *room) { *room = *room ? *room * 2 : 16; *out = RedisModule_Realloc(*out, *room * sizeof(Str)); }
            (*out)[n].p = p; (*out)[n].n = (size_t)(q - p); n++;
        }
        p = q + 1;
    }
    return n;
}

static size_t count_entries(Str t) {      /* Lua `count`: separators + 1, '' none */
    if (!t.n) return 0;
    size_t n = 1;
    for (size_t i = 0; i < t.n; i++) if (t.p[i] == SEP) n++;
    return n;
}

static int same(Str a, Str b) { return a.n == b.n && !memcmp(a.p, b.p, a.n); }

static int lua_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

static double lua_number(Str s, int *ok) {   /* Lua tonumber on a string: the whole text a number */
    while (s.n && lua_space(s.p[s.n - 1])) s.n--;
    *ok = 0;
    if (!s.n) return 0;
    char small[64], *buf = s.n < sizeof small ? small : RedisModule_Alloc(s.n + 1);
    memcpy(buf, s.p, s.n); buf[s.n] = 0;
    char *end; double d = strtod(buf, &end);
    *ok = end != buf && *end == 0;
    if (buf != small) RedisModule_Free(buf);
    return *ok ? d : 0;
}

static Str reply_str(RedisModuleCallReply *arr, size_t i) {
    Str s = {NULL, 0};
    RedisModuleCallReply *e = RedisModule_CallReplyArrayElement(arr, i);
    if (e && RedisModule_CallReplyType(e) == REDISMODULE_REPLY_STRING) s.p = RedisModule_CallReplyStringPtr(e, &s.n);
    return s;
}

/* Lua `insert`: the event's own values (in entering order) at the place of its order key */
static int insert(History *st, Str *own, size_t nown, double key, Str ks, long long cap, int distinct) {
    size_t keep = 0;
    if (distinct) {
        for (size_t a = 0; a < nown; a++) {
            int newer = 0;
            for (size_t j = st->n; j-- > 0;) {
                if (same(st->v[j], own[a])) {
                    if (st->o[j] >= key) newer = 1;
                    else {
                        memmove(st->v + j, st->v + j + 1, (st->n - j - 1) * sizeof(Str));
                        memmove(st->s + j, st->s + j + 1, (st->n - j - 1) * sizeof(Str));
                        memmove(st->o + j, st->o + j + 1, (st->n - j - 1) * sizeof(double));
                        st->n--;
                    }
                }
            }
            if (!newer) own[keep++] = own[a];
        }
        nown = keep;
    }
    if (!nown) return 0;
    size_t pos = st->n;
    for (size_t i = 0; i < st->n; i++) if (st->o[i] < key) { pos = i; break; }
    reserve(st, st->n + nown);
    memmove(st->v + pos + nown, st->v + pos, (st->n - pos) * sizeof(Str));
    memmove(st->s + pos + nown, st->s + pos, (st->n - pos) * sizeof(Str));
    memmove(st->o + pos + nown, st->o + pos, (st->n - pos) * sizeof(double));
    for (size_t k = 0; k < nown; k++) { st->v[pos + k] = own[k]; st->s[pos + k] = ks; st->o[pos + k] = key; }
    st->n += nown;
    if ((long long)st->n > cap) st->n = (size_t)cap;
    return 1;
}

static RedisModuleString *joined(RedisModuleCtx *ctx, Str *parts, size_t n) {
    size_t len = n ? n - 1 : 0;
    for (size_t i = 0; i < n; i++) len += parts[i].n;
    char *buf = RedisModule_Alloc(len + 1), *p = buf;
    for (size_t i = 0; i < n; i++) {
        if (i) *p++ = SEP;
        memcpy(p, parts[i].p, parts[i].n); p += parts[i].n;
    }
    RedisModuleString *s = RedisModule_CreateString(ctx, buf, len);
    RedisModule_Free(buf);
    return s;
}

static RedisModuleString *number_text(RedisModuleCtx *ctx, double d) {     /* Lua 5.1 tostring */
    char buf[32];
    int n = snprintf(buf, sizeof buf, "%.14g", d);
    return RedisModule_CreateString(ctx, buf, (size_t)n);
}

/* ---- the command ---------------------------------------------------------------------------- */
/* One call's state: the user's fields as read, its histories and counters as the events change them. */
typedef struct {
    Rules *R;
    RedisModuleCallReply *got;           /* HMGET of the user: _loaded_at, histories, counters */
    Str loaded;
    RedisModuleCallReply *auxgot;        /* HMGET of :ev, read when a history is first touched */
    int fresh;                           /* :ev describes other (reloaded) values: its order keys dropped */
    History *hs;
    double *counts;
    char *counted, *bumped;              /* per counter slot: parsed, incremented */
    Str *own; size_t own_room;           /* scratch: one event's values of one history */
    long long seen_n;                    /* ids in the :seen set */
} Call;

static Str or_empty(Str s) { if (!s.p) { s.p = ""; s.n = 0; } return s; }

/* a counter slot's number: the stored text parsed when first needed (Lua `count_of`) */
static double count_of(Call *c, int k) {
    if (!c->counted[k]) {
        int ok;
        c->counts[k] = lua_number(reply_str(c->got, 1 + c->R->nh + k), &ok);
        c->counted[k] = 1;
    }
    return c->counts[k];
}

/* Lua `history`: a stored list and its order keys as arrays (no order keys for these values: older
 * than any event, "0" each) */
static void load_history(History *st, Str v, Str o) {
    size_t room = 0, got_o = 0;
    Str *vs = NULL, *os = NULL;
    size_t got_v = split(v, &vs, &room, 1);
    room = 0;
    if (count_entries(o) == count_entries(v)) got_o = split(o, &os, &room, 1);
    else o.n = 0;
    reserve(st, got_v + 1);
    for (size_t j = 0; j < got_v; j++) {
        st->v[j] = vs[j];
        if (!o.n) { st->s[j].p = "0"; st->s[j].n = 1; st->o[j] = 0; }
        else if (j < got_o) { int ok; st->s[j] = os[j]; st->o[j] = lua_number(os[j], &ok); }
        else { st->s[j].p = ""; st->s[j].n = 0; st->o[j] = 0; }
    }
    st->n = got_v;
    RedisModule_Free(vs); RedisModule_Free(os);
    st->loaded = 1;
}

/* Lua `own_values`: an event's values of one history in the order they enter it, once each where
 * distinct -> their count, in c->own */
static size_t own_values(Call *c, Str vals, const HistoryRule *h) {
    if (!memchr(vals.p, SEP, vals.n)) {
        if (!c->own_room) { c->own_room = 16; c->own = RedisModule_Alloc(16 * sizeof(Str)); }
        c->own[0] = vals;
        return 1;
    }
    Str *parts = NULL; size_t room = 0;
    size_t np = split(vals, &parts, &room, 0), nown = 0;
    if (c->own_room < np + 1) { c->own_room = np + 1; c->own = RedisModule_Realloc(c->own, c->own_room * sizeof(Str)); }
    for (size_t k = 0; k < np; k++) {
        Str x = parts[h->reversed ? np - 1 - k : k];
        int twice = 0;
        if (h->distinct) for (size_t m = 0; m < nown; m++) if (same(c->own[m], x)) { twice = 1; break; }
        if (!twice) c->own[nown++] = x;
    }
    RedisModule_Free(parts);
    return nown;
}

enum { NEW, DUP, LATE, FAILED };

/* a call that failed (no reply, or an error reply): kept in *err for the command's own reply */
static int call_failed(RedisModuleCallReply *r, RedisModuleCallReply **err) {
    if (r && RedisModule_CallReplyType(r) != REDISMODULE_REPLY_ERROR) return 0;
    *err = r;
    return 1;
}

/* Lua `admit`: a known id is a duplicate; with the id set full, an event older than all of it is late;
 * else the id is remembered (the oldest beyond the horizon forgotten). FAILED: *err is the reply */
static int admit(RedisModuleCtx *ctx, Call *c, RedisModuleString *seen, RedisModuleString *id,
                 RedisModuleString *ksarg, double key, RedisModuleCallReply **err) {
    RedisModuleCallReply *r;
#define TRY(call) do { r = (call); if (call_failed(r, err)) return FAILED; } while (0)
    if (c->seen_n < c->R->dedup) {
        TRY(RedisModule_Call(ctx, "ZADD", "!scss", seen, "NX", ksarg, id));
        if (RedisModule_CallReplyInteger(r) == 0) return DUP;
        c->seen_n++;
        return NEW;
    }
    TRY(RedisModule_Call(ctx, "ZSCORE", "ss", seen, id));
    if (RedisModule_CallReplyType(r) != REDISMODULE_REPLY_NULL) return DUP;
    TRY(RedisModule_Call(ctx, "ZRANGE", "sllc", seen, 0LL, 0LL, "WITHSCORES"));
    Str o = reply_str(r, 1);
    int ok; double oldest = o.p ? lua_number(o, &ok) : 0;
    if (o.p && ok && key < oldest) return LATE;
    TRY(RedisModule_Call(ctx, "ZADD", "!sss", seen, ksarg, id));
    TRY(RedisModule_Call(ctx, "ZREMRANGEBYRANK", "!sll", seen, 0LL, c->seen_n - c->R->dedup));
    c->seen_n = c->R->dedup;
    return NEW;
#undef TRY
}

/* the hash writes of the events applied (Lua: after the loop): histories and their order keys,
 * counters bumped, every bucket, `_event_at`. -> 1 when a call failed (*err) */
static int write_back(RedisModuleCtx *ctx, Call *c, RedisModuleString *user, RedisModuleString *aux,
                      RedisModuleString *now, RedisModuleCallReply **err) {
    Rules *R = c->R;
    size_t room = 2 * (size_t)(R->nh + R->nc + R->nb) + 4, nset = 0, ndel = 0, naux = 0;
    RedisModuleString **args = RedisModule_Calloc(3 * room, sizeof(RedisModuleString *));
    RedisModuleString **hset = args, **hdel = args + room, **auxset = args + 2 * room;
    auxset[naux++] = R->base;
    auxset[naux++] = RedisModule_CreateString(ctx, c->loaded.p, c->loaded.n);
    for (int i = 0; i < R->nh; i++) {
        if (!c->hs[i].dirty) continue;
        hset[nset++] = R->h[i].field; hset[nset++] = joined(ctx, c->hs[i].v, c->hs[i].n);
        auxset[naux++] = R->h[i].tfield; auxset[naux++] = joined(ctx, c->hs[i].s, c->hs[i].n);
    }
    for (int i = 0; i < R->nc; i++)
        if (c->bumped[i]) { hset[nset++] = R->c[i].field; hset[nset++] = number_text(ctx, c->counts[i]); }
    for (int i = 0; i < R->nb; i++) {
        BucketRule *b = &R->b[i];
        double value = count_of(c, b->num);
        if (b->den >= 0) {
            double den = count_of(c, b->den);
            if (den == 0) { hdel[ndel++] = b->field; continue; }     /* no rate: the field unset */
            value = value / den;
        }
        int k = 0;
        for (int e = 0; e < b->nedges; e++) if (b->edges[e] < value) k++;
        hset[nset++] = b->field; hset[nset++] = b->labels[k];
    }
    hset[nset++] = R->event_at; hset[nset++] = now;
    int failed = call_failed(RedisModule_Call(ctx, "HSET", "!sv", user, hset, nset), err)
        || (ndel && call_failed(RedisModule_Call(ctx, "HDEL", "!sv", user, hdel, ndel), err))
        || (naux > 2 && c->fresh && call_failed(RedisModule_Call(ctx, "DEL", "!s", aux), err))   /* a history changed */
        || (naux > 2 && call_failed(RedisModule_Call(ctx, "HSET", "!sv", aux, auxset, naux), err));
    RedisModule_Free(args);
    return failed;
}

/* one applied event's history inserts and counter increments -> 1 when a call failed (*err) */
static int apply_event(RedisModuleCtx *ctx, Call *c, RedisModuleString **lists, long long nl, int t, double key,
                       Str ks, RedisModuleString *aux, RedisModuleCallReply **err) {
    Rules *R = c->R;
    for (int i = 0; i < R->nh; i++) {
        HistoryRule *h = &R->h[i];
        if (t < 0 || !h->on[t]) continue;
        Str vals = {NULL, 0};
        for (long long j = 0; j < nl; j++) {      /* the last pair of that name, as the Lua table keeps it */
            Str name; name.p = RedisModule_StringPtrLen(lists[2 * j], &name.n);
            if (same(name, h->src)) vals.p = RedisModule_StringPtrLen(lists[2 * j + 1], &vals.n);
        }
        if (!vals.p || !vals.n) continue;
        History *st = &c->hs[i];
        if (!st->loaded) {
            if (!c->auxgot) {
                c->auxgot = RedisModule_Call(ctx, "HMGET", "sv", aux, R->auxwant, (size_t)(1 + R->nh));
                if (call_failed(c->auxgot, err)) return 1;
                c->fresh = !same(or_empty(reply_str(c->auxgot, 0)), c->loaded);
            }
            Str none = {"", 0};
            load_history(st, or_empty(reply_str(c->got, 1 + i)), c->fresh ? none : or_empty(reply_str(c->auxgot, 1 + i)));
        }
        size_t nown = own_values(c, vals, h);
        if (insert(st, c->own, nown, key, ks, h->cap, h->distinct)) st->dirty = 1;
    }
    for (int i = 0; i < R->nc; i++) {
        if (t < 0 || !R->c[i].on[t]) continue;
        int k = R->c[i].slot;
        c->counts[k] = count_of(c, k) + 1;
        c->bumped[k] = 1;
    }
    return 0;
}

static int apply_events(RedisModuleCtx *ctx, Call *c, RedisModuleString **argv, int argc) {
    RedisModuleString *user = argv[1], *aux = argv[2], *seen = argv[3], *ttl = argv[5], *now = argv[6];
    RedisModuleCallReply *err = NULL, *r;
    c->got = RedisModule_Call(ctx, "HMGET", "sv", user, c->R->want, (size_t)(1 + c->R->nh + c->R->nc));
    if (call_failed(c->got, &err)) goto failed;
    c->loaded = or_empty(reply_str(c->got, 0));
    r = RedisModule_Call(ctx, "ZCARD", "s", seen);
    if (call_failed(r, &err)) goto failed;
    c->seen_n = RedisModule_CallReplyInteger(r);
    long long counted[3] = {0, 0, 0};      /* applied, duplicate, late */
    int a = 7;
    while (a + 3 < argc) {
        long long nl = -1;
        RedisModule_StringToLongLong(argv[a + 3], &nl);
        if (nl < 0 || nl > (long long)(argc - a - 4) / 2)
            return RedisModule_ReplyWithError(ctx, "ERR MVKE.APPLY: an event's count of lists is not one its arguments hold");
        Str ks, typ;
        ks.p = RedisModule_StringPtrLen(argv[a + 1], &ks.n);
        typ.p = RedisModule_StringPtrLen(argv[a + 2], &typ.n);
        int ok; double key = lua_number(ks, &ok);
        int verdict = admit(ctx, c, seen, argv[a], argv[a + 1], key, &err);
        if (verdict == FAILED) goto failed;
        if (verdict == NEW && apply_event(ctx, c, argv + a + 4, nl, type_index(typ.p, typ.n), key, ks, aux, &err))
            goto failed;
        counted[verdict == NEW ? 0 : verdict == DUP ? 1 : 2]++;
        a += 4 + 2 * (int)nl;
    }
    if (a != argc) return RedisModule_ReplyWithError(ctx, "ERR MVKE.APPLY: the events' arguments do not add up");
    if (counted[0] > 0 && write_back(ctx, c, user, aux, now, &err)) goto failed;
    Str ttl_text; ttl_text.p = RedisModule_StringPtrLen(ttl, &ttl_text.n);
    int ttl_ok; double ttl_s = lua_number(ttl_text, &ttl_ok);
    if (ttl_ok && ttl_s > 0) {           /* Lua: tonumber(ARGV[1]) > 0, handed to EXPIRE as its number */
        RedisModuleString *secs = number_text(ctx, ttl_s);
        RedisModuleString *keys[2] = {aux, seen};
        for (int k = 0; k < 2; k++) {
            if (call_failed(RedisModule_Call(ctx, "EXPIRE", "!ss", keys[k], secs), &err)) goto failed;
        }
    }
    RedisModule_ReplyWithArray(ctx, 3);
    for (int k = 0; k < 3; k++) RedisModule_ReplyWithLongLong(ctx, counted[k]);
    return REDISMODULE_OK;
failed:      /* as the Lua function's redis.call raising: the writes made so far stay */
    if (err) return RedisModule_ReplyWithCallReply(ctx, err);
    return RedisModule_ReplyWithError(ctx, "ERR a call inside MVKE.APPLY failed");
}

static int apply_command(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc < 7) return RedisModule_WrongArity(ctx);
    RedisModule_AutoMemory(ctx);
    Rules *R = rules_of(argv[4]);
    if (!R) return RedisModule_ReplyWithError(ctx, "ERR MVKE.APPLY: rules not understood (EventRules.to_native)");
    int nh = R->nh ? R->nh : 1, nc = R->nc ? R->nc : 1;
    Call c = {.R = R};
    c.hs = RedisModule_Calloc(nh, sizeof(History));
    c.counts = RedisModule_Calloc(nc, sizeof(double));
    c.counted = RedisModule_Calloc(nc, 1);
    c.bumped = RedisModule_Calloc(nc, 1);
    apply_events(ctx, &c, argv, argc);
    for (int i = 0; i < R->nh; i++) { RedisModule_Free(c.hs[i].v); RedisModule_Free(c.hs[i].s); RedisModule_Free(c.hs[i].o); }
    RedisModule_Free(c.hs); RedisModule_Free(c.counts); RedisModule_Free(c.counted); RedisModule_Free(c.bumped);
    RedisModule_Free(c.own);
    return REDISMODULE_OK;
}

int RedisModule_OnLoad(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv; (void)argc;
    if (RedisModule_Init(ctx, "mvkeapply", 1, REDISMODULE_APIVER_1) == REDISMODULE_ERR) return REDISMODULE_ERR;
    if (RedisModule_CreateCommand(ctx, "mvke.apply", apply_command, "write deny-oom", 1, 3, 1) == REDISMODULE_ERR)
        return REDISMODULE_ERR;
    return REDISMODULE_OK;
}
