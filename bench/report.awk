# bench/report.awk: turns bench/run's results file into markdown tables.
# Input: one line per wrk run, space-separated key=value fields (target,
# scenario, round, wrk's RESULT fields, ticks_<process> CPU ticks, and for
# sends to Redis fcalls = the FCALLs Redis ran meanwhile).
# Variables: scenarios and targets (space-separated, in order), tck (clock ticks/s),
# cores (CPUs, to say how busy the rest of the machine was).

# Median of the space-separated numbers in list; "na" entries (percentiles
# wrk could not give) are skipped, and "na" is returned if all are.
function median(list,    n, m, a, b, i, j, t, k) {
    m = split(list, b, " ")
    n = 0
    for (i = 1; i <= m; i++) if (b[i] != "na") a[++n] = b[i]
    if (n == 0) return (m == 0) ? "-" : "na"
    for (i = 2; i <= n; i++) {            # insertion sort, n is tiny
        t = a[i] + 0
        for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]
        a[j + 1] = t
    }
    k = int((n + 1) / 2)
    return (n % 2) ? a[k] + 0 : (a[k] + a[k + 1]) / 2
}

function errors(key,    s, t, i, types, n) {
    n = split("connect read write timeout status", types, " ")
    s = ""
    for (i = 1; i <= n; i++) {
        t = err[key, types[i]] + 0
        if (t > 0) s = s (s == "" ? "" : " ") types[i] "=" t
    }
    return s == "" ? "0" : s
}

function num(x) { return (x == "na" || x == "-") ? x : sprintf("%.0f", x) }

# "CPU s (µs/req)" for one process, or "-" if it was not measured.
function cpu(key, proc,    t) {
    if (!((key, proc) in ticks)) return "-"
    t = ticks[key, proc] / tck
    return sprintf("%.2f s (%.1f)", t, t * 1e6 / requests[key])
}

{
    delete v
    for (i = 1; i <= NF; i++) {
        eq = index($i, "=")
        v[substr($i, 1, eq - 1)] = substr($i, eq + 1)
    }
    if (v["round"] ~ /^leak/) next
    other_ticks += v["ticks_other"]; run_seconds += v["duration_s"]
    key = v["target"] SUBSEP v["scenario"]
    rps[key] = rps[key] " " v["rps"]
    p50[key] = p50[key] " " v["p50_us"]
    p99[key] = p99[key] " " v["p99_us"]
    p999[key] = p999[key] " " v["p999_us"]
    requests[key] += v["requests"]
    dur[key] += v["duration_s"]
    for (k in v) {
        if (k ~ /^err_/) err[key, substr(k, 5)] += v[k]
        if (k ~ /^ticks_/) { ticks[key, substr(k, 7)] += v[k]; allticks[key] += v[k] }
    }
    if ("fcalls" in v) fcalls[key] += v["fcalls"]
}

END {
    n = split(scenarios, sc, " ")
    nt = split(targets, tg, " ")
    print "\"nginx\": one worker per core (this machine's HTTP ceiling); \"nginx1\": one worker (the older reference)."
    print "Every other row is a stack of ours (bench/run --stack; `standalone` is the default three tiers)."
    print ""
    print "| scenario | server | req/s | /nginx | /nginx1 | p50 | p99 | p99.9 | errors |"
    print "|---|---|---:|---:|---:|---:|---:|---:|---|"
    for (i = 1; i <= n; i++) {
        rg = median(rps["nginx" SUBSEP sc[i]]); rg1 = median(rps["nginx1" SUBSEP sc[i]])
        for (t = 1; t <= nt; t++) {
            key = tg[t] SUBSEP sc[i]
            if (!(key in requests)) continue
            r = median(rps[key])
            printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", sc[i], tg[t], num(r),
                (rg > 0 ? sprintf("%.2f", r / rg) : "-"), (rg1 > 0 ? sprintf("%.2f", r / rg1) : "-"),
                num(median(p50[key])), num(median(p99[key])), num(median(p999[key])), errors(key)
        }
    }
    print ""
    print "CPU used during the runs, summed over rounds: seconds (µs per request); a tier of several"
    print "processes (rpc3's RPC servers, gw2's gateways, a cluster's nodes) is their sum. \"FCALLs/msg\":"
    print "im_send calls Redis ran per message stored. \"other processes\": CPU time the machine spent on"
    print "anything else meanwhile (it should be near 0; if not, the numbers are skewed)."
    print ""
    print "\"idle\": the share of the machine's CPU time (all cores) that no process used during the runs."
    print "In `all`, `all-baseline` and `peer` the one process is counted as the gateway."
    print ""
    print "| scenario | server | requests | gateway | rpc | redis | nginx workers | wrk | servers µs/req | FCALLs/msg | other processes | idle |"
    print "|---|---|---:|---|---|---|---|---|---:|---:|---|---:|"
    for (i = 1; i <= n; i++) {
        for (t = 1; t <= nt; t++) {
            target = tg[t]
            key = target SUBSEP sc[i]
            if (!(key in requests)) continue
            total = 0
            split("gateway rpc redis nginx", procs, " ")
            for (p = 1; p <= 4; p++) if ((key, procs[p]) in ticks) total += ticks[key, procs[p]]
            idle = (dur[key] > 0) ? 100 - allticks[key] / tck / (dur[key] * cores) * 100 : 0
            printf "| %s | %s | %d | %s | %s | %s | %s | %s | %.1f | %s | %.2f s | %.0f%% |\n", sc[i], target, requests[key],
                cpu(key, "gateway"), cpu(key, "rpc"), cpu(key, "redis"), cpu(key, "nginx"),
                cpu(key, "wrk"), total / tck * 1e6 / requests[key],
                ((key in fcalls) && requests[key] > 0 ? sprintf("%.3f", fcalls[key] / requests[key]) : "-"),
                ticks[key, "other"] / tck, (idle < 0 ? 0 : idle)
        }
    }
    ratios(n, nt)
    busy = (run_seconds > 0) ? other_ticks / tck / (run_seconds * cores) * 100 : 0
    if (busy >= 5) {
        print ""
        printf "**Warning: other processes used %.0f%% of the machine's CPU during the runs; the numbers above are skewed by that.**\n", busy
    }
    if (scenarios ~ /pipeline/) {
        print ""
        print "Pipelined latencies are per batch of 16 (wrk times the write of a batch to its last response)."
        print "\"na\": wrk's coordinated-omission correction assumes one request per write, and with"
        print "pipelining its histogram cannot give that percentile (see bench/common.lua)."
    }
}

# Same-run ratios of each stack's median req/s against the reference stacks
# that ran (all-baseline, baseline, peer), with the spread over rounds (each a
# fresh start with bench/run --restart): the lowest round against the median.
function ratios(n, nt,    i, t, r, refs, nr, j, ref, line, key, lo, m, a, k) {
    nr = split("all-baseline baseline peer", refs, " ")
    line = ""
    for (j = 1; j <= nr; j++) if ((refs[j] SUBSEP sc[1]) in requests) line = line " | /" refs[j]
    if (line == "") return
    print ""
    print "| scenario | server | req/s" line " | lowest round vs median |"
    printf "|---|---|---:"
    for (j = 1; j <= nr; j++) if ((refs[j] SUBSEP sc[1]) in requests) printf "|---:"
    print "|---:|"
    for (i = 1; i <= n; i++) {
        for (t = 1; t <= nt; t++) {
            key = tg[t] SUBSEP sc[i]
            if (!(key in requests) || tg[t] ~ /^nginx/) continue
            r = median(rps[key])
            printf "| %s | %s | %s", sc[i], tg[t], num(r)
            for (j = 1; j <= nr; j++) {
                ref = refs[j] SUBSEP sc[i]
                if (!((refs[j] SUBSEP sc[1]) in requests)) continue
                m = median(rps[ref])
                printf " | %s", (m > 0 ? sprintf("%.2f", r / m) : "-")
            }
            k = split(rps[key], a, " "); lo = ""
            for (j = 1; j <= k; j++) if (lo == "" || a[j] + 0 < lo + 0) lo = a[j]
            printf " | %s |\n", (r > 0 ? sprintf("%+.1f%%", (lo - r) * 100 / r) : "-")
        }
    }
}
